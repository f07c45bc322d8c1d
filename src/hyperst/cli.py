"""The ``hyperst`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hyperst._version import __version__

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    print(
        "hyperst demo: not yet available in this version. The end-to-end demo (synthetic data → "
        "preprocess → fit → predict → evaluate → report) arrives with hst.pp, hst.tl and hst.pl.\n"
        f"Installed: hyperst {__version__} with the model core (hyperst.geometry, hyperst.nn)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hyperst`` command."""
    parser = argparse.ArgumentParser(
        prog="hyperst", description="Predict spatial gene expression from H&E histology (HyperST)."
    )
    parser.add_argument("--version", action="version", version=f"hyperst {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="Run the end-to-end demo on synthetic data.")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyperst`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
