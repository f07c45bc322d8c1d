"""The ``hyperst`` command line: ``demo``, ``fit``, ``predict``, ``evaluate`` and ``benchmark``.

``hyperst predict --model DIR --slide SLIDE.svs --out OUT.zarr`` is the main use case: a scanner slide in, a
SpatialData store with the predicted expression over the tissue (and a figure ``OUT.png``) out.

A user error (a missing file, invalid JSON, a bad argument the library refuses) prints one line
``hyperst: error: <message>`` to stderr and exits with status 2, as argparse does for usage errors; the global
``--debug`` flag shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperst._constants import DEFAULT_BACKBONE
from hyperst._demo import run_demo, say
from hyperst._version import __version__

__all__ = ["CLIError", "build_parser", "main", "run_demo"]

#: exit status of a user error (argparse uses it for usage errors too)
USER_ERROR = 2
#: errors of user input: printed as one line (tracebacks with --debug); anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, TypeError, OSError)


class CLIError(Exception):
    """A user error found by the command line itself (printed as ``hyperst: error: <message>``, exit status 2)."""


# ---------------------------------------------------------------------------------------------- commands
def _demo(args: argparse.Namespace) -> int:
    metrics = run_demo(args.out, her2st=args.her2st, seed=args.seed, epochs=args.epochs, backbone=args.backbone,
                       progress=args.progress, grid=args.grid)
    return 0 if metrics["beats_mean_predictor"] else 1


def _read(path: str, *, what: str = "data") -> Any:
    """Read an ``.h5ad`` table or a ``.zarr`` SpatialData store, with errors that name ``what`` and the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} {path!r} does not exist (expected an .h5ad table or a .zarr SpatialData store).")
    if p.is_dir():
        import spatialdata as sd

        try:
            return sd.read_zarr(p)
        except (ValueError, OSError, KeyError) as err:
            raise CLIError(f"{what} {path!r} is not a readable SpatialData .zarr store ({_one_line(err)}).") from err
    if p.suffix != ".h5ad":
        raise CLIError(f"{what} {path!r} is a file but not an .h5ad table; pass an .h5ad file or a .zarr store folder.")
    import anndata as ad

    try:
        return ad.read_h5ad(p)
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(f"{what} {path!r} is not a readable .h5ad file ({_one_line(err)}).") from err


def _json_object(value: str | None, *, flag: str) -> dict[str, Any] | None:
    """A JSON object given inline (``'{"emb_dim": 512}'``) or as the path of a ``.json`` file."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        text, where = path.read_text(), f"file {value!r}"
    elif value.lstrip()[:1] in ("{", "[", '"') or value.strip() in ("null", "true", "false"):
        text, where = value, "the inline value"
    else:
        raise CLIError(f"{flag} {value!r} is neither inline JSON (e.g. '{{\"emb_dim\": 512}}') nor an existing "
                       ".json file.")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(
            f"{flag}: {where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    if not isinstance(obj, dict):
        raise CLIError(f"{flag} must be a JSON object such as {{\"emb_dim\": 512}}, got {type(obj).__name__}.")
    return obj


def _model_folder(path: str) -> Path:
    """Check that ``path`` is a model folder written by ``hyperst fit`` (before anything heavy is loaded)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CLIError(f"--model {path!r} does not exist; pass the folder `hyperst fit --out` wrote.")
    if not folder.is_dir():
        raise CLIError(f"--model {path!r} is a file; pass the model folder `hyperst fit --out` wrote.")
    config = folder / "hyperst.json"
    if not config.is_file():
        raise CLIError(f"--model {path!r} is not a hyperst model folder: it has no hyperst.json.")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"--model {path!r}: hyperst.json is not valid JSON ({_one_line(err)}); the folder is damaged, "
                       "save the model again.") from err
    return folder


def _check_out(path: str, *, overwrite: bool | None = None, marker: str | None = None) -> None:
    """Refuse ``--out`` before the work: an existing result without ``--overwrite``, a missing parent folder.

    An existing result is the ``marker`` file inside ``path`` (a model folder's hyperst.json), else a non-empty
    folder; ``overwrite=None`` skips that test.
    """
    out = Path(path).expanduser()
    if overwrite is False and out.exists():
        taken = (out / marker).exists() if marker else out.is_file() or any(out.iterdir())
        if taken:
            raise CLIError(f"--out {path!r} already holds a result; pass --overwrite to replace it or choose "
                           "another path.")
    if not out.parent.exists():
        raise CLIError(f"--out {path!r}: the folder {str(out.parent)!r} does not exist.")


def _devices(value: str) -> int | str | list[int]:
    """``--devices``: ``auto``, a device count (``-1``: all) or a comma-separated list of device ids."""
    text = value.strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            ids = [int(v) for v in text.split(",") if v.strip()]
            if ids and all(i >= 0 for i in ids):
                return ids
        elif int(text) >= 1 or int(text) == -1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"{value!r} is not 'auto', a device count (e.g. 2, or -1 for all) or a list of device ids (e.g. 0,1)"
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError | FileNotFoundError) and not text:
        text = repr(err)
    return text or type(err).__name__


def _members(value: str) -> int | str:
    """``--members``: ``auto`` or a positive count."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {value!r}")
    return int(value)


def _fit(args: argparse.Namespace) -> int:
    import hyperst as hst

    config = _json_object(args.config, flag="--config")
    _check_out(args.out, overwrite=args.overwrite, marker="hyperst.json")
    data = [_read(p) for p in args.data]
    if args.views:  # the training slides also as other scanners, resolutions, stains and exports show them
        from anndata import AnnData

        for path, item in zip(args.data, data, strict=True):
            if isinstance(item, AnnData):
                raise CLIError(f"--views needs the slide images: {path!r} is a table; pass its .zarr store.")
            hst.pp.image_features(item, backbone=args.backbone, views="default", progress=args.progress)
    model = hst.tl.fit(
        data, mode=args.mode, preset=args.preset, config=config, backbone=args.backbone, max_epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, min_tissue=args.min_tissue,
        progress=args.progress, devices=args.devices, strategy=args.strategy, n_members=args.members,
        checkpoint_dir=args.checkpoint_dir,
    )
    model.save(args.out, overwrite=args.overwrite)
    if model.interrupted:
        folder = args.checkpoint_dir
        again = f" (rerun with the same --checkpoint-dir {folder} to resume)" if folder else ""
        say(f"training was interrupted: the model saved to {args.out} has the best weights so far{again}")
    else:
        say(f"model saved to {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import hyperst as hst

    if (args.data is None) == (args.slide is None):
        raise CLIError("pass either DATA (a .zarr store or .h5ad table) or --slide SLIDE (a scanner slide), not "
                       + ("both." if args.data else "neither."))
    folder = _model_folder(args.model)
    if args.slide is not None:
        return _predict_slide(args, folder)
    if args.pitch is not None or args.min_tissue is not None:
        raise CLIError("--pitch and --min-tissue shape the pseudo-spot grid of --slide; with DATA pass a .zarr "
                       "store without spots and use the Python API's grid= option.")
    data = _read(args.data)
    _check_out(args.out, overwrite=None)
    model = hst.tl.HyperST.load(folder, device=args.device)
    pred = hst.tl.predict(model, data, pixel_size=args.pixel_size, alpha=args.alpha, progress=args.progress)
    pred.write_h5ad(args.out)
    say(f"prediction for {pred.n_obs} spots × {pred.n_vars} genes written to {args.out}")
    _say_flags(pred)
    return 0


def _say_flags(pred: Any) -> None:
    domain = pred.uns.get("hyperst", {}).get("predict", {}).get("domain")
    if domain is not None:
        flagged = [name for name, v in domain["slides"].items() if len(v["flags"])]
        say(f"{domain['ood_fraction']:.0%} of the spots flagged as unlike the training data"
            + (f"; slides flagged: {flagged}" if flagged else ""))


def _predict_slide(args: argparse.Namespace, folder: Path) -> int:
    """``hyperst predict --slide``: slide → tissue → pseudo-spots → prediction → SpatialData zarr + PNG figure."""
    import shutil

    import hyperst as hst
    from hyperst._constants import Key

    out = Path(args.out).expanduser()
    if out.suffix != ".zarr":
        raise CLIError(f"--out {args.out!r}: with --slide the result is a SpatialData store; name it OUT.zarr.")
    if not Path(args.slide).expanduser().is_file():
        raise CLIError(f"--slide {args.slide!r} does not exist (expected a scanner slide: .svs, .tif, .ome.tif).")
    _check_out(args.out, overwrite=args.overwrite)
    if out.exists() and not (out / "zarr.json").is_file() and not (out / ".zgroup").is_file():
        raise CLIError(f"--out {args.out!r} exists and is not a zarr store; refusing to replace it.")
    grid = {k: v for k, v in (("pitch", args.pitch), ("min_tissue", args.min_tissue)) if v is not None}
    sdata = hst.datasets.read_slide(args.slide, pixel_size=args.pixel_size)
    sample, record = next(iter(sdata.attrs[Key.UNS][Key.ATTRS_SLIDE].items()))
    say(f"{sample}: {record['format']} slide, {record['pixel_size']:.4g} µm/px ({record['pixel_size_source']})")
    model = hst.tl.HyperST.load(folder, device=args.device)
    unknown = [g for g in args.genes or [] if g not in model.genes]
    if unknown:
        raise CLIError(f"--genes {unknown} are not genes of the model; it predicts e.g. {list(model.genes[:5])}.")
    pred = hst.tl.predict(model, sdata, pixel_size=record["pixel_size"], alpha=args.alpha, grid=grid or None,
                          device=args.device, progress=args.progress)
    if out.exists():
        shutil.rmtree(out)
    sdata.write(out)
    say(f"prediction for {pred.n_obs} pseudo-spots × {pred.n_vars} genes written to {out} "
        f"(table {Key.TABLE_PREDICTION!r})")
    _say_flags(pred)
    figure = out.with_suffix(".png")
    _slide_figure(sdata, pred, figure, genes=args.genes)
    say(f"figure: {figure}")
    return 0


def _slide_figure(sdata: Any, pred: Any, path: Path, *, genes: Sequence[str] | None) -> None:
    """Predicted expression over the H&E: the named genes, else the three of largest spread over the slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import hyperst as hst

    if not genes:
        spread = np.asarray(pred.X).std(axis=0)
        genes = [str(g) for g in pred.var_names[np.argsort(-spread, kind="stable")[:3]]]
    fig = hst.pl.spatial(sdata, list(genes), ncols=len(genes), show=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evaluate(args: argparse.Namespace) -> int:
    import hyperst as hst

    truth = _read(args.truth, what="truth")
    if not hasattr(truth, "obs"):
        if args.table_key not in truth.tables:
            raise CLIError(f"--table-key {args.table_key!r} is not a table of {args.truth!r}; its tables: "
                           f"{sorted(truth.tables)}.")
        truth = truth.tables[args.table_key]
    pred = _read(args.prediction, what="prediction")
    res = hst.tl.evaluate(truth, pred)
    wide = res.wide()
    print(wide.to_string())
    if args.out:
        res.summary.to_csv(args.out, index=False)
    return 0


def _benchmark_data(args: argparse.Namespace) -> Any:
    """The inputs of ``hyperst benchmark`` as one AnnData table with image features."""
    import hyperst as hst

    cache = Path(args.features_cache) if args.features_cache else None
    if cache is not None and cache.is_file():
        say(f"image features from {cache}")
        return _read(str(cache), what="--features-cache")
    items: list[Any] = [_read(p) for p in args.data]
    if args.her2st:
        items.append(hst.datasets.her2st(args.her2st))
    if args.hest:
        if not args.hest_ids:
            raise CLIError("--hest needs --hest-ids (the HEST sample ids to read).")
        items.append(hst.datasets.hest(args.hest, args.hest_ids))
    if not items:
        raise CLIError("Give data: .zarr stores / .h5ad tables, --her2st DIR, or --hest ROOT --hest-ids ID ...")
    tables = []
    for item in items:
        if hasattr(item, "tables"):  # SpatialData: features computed here unless its table has them
            hst.pp.image_features(item, backbone=args.backbone, table_key=args.table_key, progress=args.progress)
            keys = list(item.tables)
            if len(keys) != 1 and args.table_key is None:
                raise CLIError(f"A SpatialData has tables {keys}: pass --table-key.")
            item = item.tables[args.table_key or keys[0]]
        tables.append(item)
    from hyperst.tl._utils import combined_table

    table = combined_table(tables, None, args.groupby)  # shared genes, unique spot names
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        table.write_h5ad(cache)
        say(f"image features cached in {cache}")
    return table


def _benchmark(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import hyperst as hst
    from hyperst.tl._benchmark import DEFAULT_FIT_KWARGS
    from hyperst.tl._benchmark_report import compare_markdown

    _check_out(args.out, overwrite=args.overwrite)
    fit_overrides = _json_object(args.fit_kwargs, flag="--fit-kwargs")
    gene_sets = None
    if args.gene_sets:
        gene_sets = {}
        for spec in args.gene_sets:
            flavor, _, n = spec.partition(":")
            if flavor not in ("mean", "hmhvg", "hvg") or not n.isdigit():
                raise CLIError(f"--gene-sets entries look like mean:250 or hmhvg:300, got {spec!r}.")
            gene_sets[f"{flavor}{n}"] = {"flavor": flavor, "n_top": int(n)}
    table = _benchmark_data(args)
    fit_kwargs = dict(DEFAULT_FIT_KWARGS)
    fit_kwargs.update(fit_overrides or {})
    res = hst.tl.benchmark(
        table, methods=args.methods, groupby=args.groupby, seeds=args.seeds, gene_sets=gene_sets,
        normalize=args.normalized, fit_kwargs=fit_kwargs, n_jobs=args.n_jobs, threads_per_job=args.threads,
        progress=args.progress,
    )
    out = Path(args.out)
    res.save(out, overwrite=args.overwrite, metric=args.metric, reference=args.reference)  # + scores.png, index.html
    text = res.to_markdown() + "\n" + compare_markdown(res.compare(args.reference))
    (out / "report.md").write_text(text)
    print(text)
    say(f"scores, timings, report.md, scores.png and index.html written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hyperst`` command."""
    parser = argparse.ArgumentParser(
        prog="hyperst", description="Predict spatial gene expression from H&E histology (HyperST)."
    )
    parser.add_argument("--version", action="version", version=f"hyperst {__version__}")
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", parents=[common],
                          help="End to end on synthetic data (or Her2ST): fit, predict, evaluate, report.")
    demo.add_argument("--out", default=None,
                      help="report folder (default: a new hyperst-demo-YYYYMMDD-HHMMSS in the current folder)")
    demo.add_argument("--her2st", default=None, metavar="DIR", help="run on the Her2ST folder instead")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--backbone", default=DEFAULT_BACKBONE)
    demo.add_argument("--grid", type=int, default=12,
                      help="spots per side of the synthetic slides (default 12; smaller: a quicker look)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="progress bars for the steps (default: on)")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", parents=[common],
                         help="Train on SpatialData zarr stores (or h5ad tables with features).")
    fit.add_argument("data", nargs="+", help="training .zarr stores or .h5ad tables")
    fit.add_argument("--out", required=True, help="model directory")
    fit.add_argument("--mode", choices=["frozen", "lora"], default="frozen")
    fit.add_argument("--preset", default="hyperst")
    fit.add_argument("--config", default=None,
                     help='network overrides: inline JSON (e.g. \'{"emb_dim": 512}\') or a .json file')
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE)
    fit.add_argument("--epochs", type=int, default=200)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--lr", type=float, default=1e-4)
    fit.add_argument("--seed", type=int, default=42)
    fit.add_argument("--device", default="auto")
    fit.add_argument("--devices", type=_devices, default="auto",
                     help="Lightning devices: auto, a count (e.g. 4; -1 for all) or ids (e.g. 0,1)")
    fit.add_argument("--strategy", default="auto", help="Lightning strategy (e.g. ddp)")
    fit.add_argument("--min-tissue", type=float, default=None)
    fit.add_argument("--views", action="store_true",
                     help="also train on the slides at 1, 2 and 4 µm/px, stain-shifted and with the glass painted "
                          "black/white (hst.pp.DEFAULT_VIEWS; 7x the feature extraction; .zarr inputs)")
    fit.add_argument("--members", type=_members, default="auto",
                     help="ensemble members: auto (one per held-out slide fold, ≤ 5) or a count")
    fit.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                     help="save the training state every epoch and resume from it (Ctrl-C stops cleanly)")
    fit.add_argument("--overwrite", action="store_true")
    fit.add_argument("--progress", action="store_true")
    fit.set_defaults(func=_fit)

    pred = sub.add_parser("predict", parents=[common],
                          help="Predict expression from H&E: a SpatialData zarr store, a table, or a scanner slide.")
    pred.add_argument("data", nargs="?", default=None,
                      help=".zarr store (H&E image, with or without spots) or .h5ad with features")
    pred.add_argument("--slide", default=None, metavar="SLIDE",
                      help="a scanner slide (.svs, .tif, .ome.tif): tissue detection, pseudo-spots, prediction, "
                           "written as OUT.zarr with a figure OUT.png")
    pred.add_argument("--model", required=True, help="model directory")
    pred.add_argument("--out", required=True, help="output .h5ad (DATA) or .zarr (--slide)")
    pred.add_argument("--pixel-size", type=float, default=None,
                      help="µm per level-0 pixel (needed without spots; --slide: default from the file)")
    pred.add_argument("--alpha", type=float, default=0.1, help="miscoverage of the intervals (0.1: 90 %%)")
    pred.add_argument("--pitch", type=float, default=None,
                      help="--slide: µm between pseudo-spots (default: the model's spot pitch)")
    pred.add_argument("--min-tissue", type=float, default=None,
                      help="--slide: smallest tissue fraction of a pseudo-spot's window (default 0.5)")
    pred.add_argument("--genes", nargs="+", default=None, help="--slide: genes of the figure (default: 3 most varying)")
    pred.add_argument("--overwrite", action="store_true", help="--slide: replace an existing OUT.zarr")
    pred.add_argument("--device", default="auto")
    pred.add_argument("--progress", action="store_true")
    pred.set_defaults(func=_predict)

    ev = sub.add_parser("evaluate", parents=[common], help="Per-gene Pearson r, PCC@K, MSE, MAE of a prediction.")
    ev.add_argument("truth", help=".h5ad table or .zarr store with measured counts")
    ev.add_argument("prediction", help=".h5ad written by `hyperst predict`")
    ev.add_argument("--table-key", default="table")
    ev.add_argument("--out", default=None, help="CSV of the tidy summary")
    ev.set_defaults(func=_evaluate)

    bench = sub.add_parser("benchmark", parents=[common],
                           help="HyperST vs ablations and baselines, cross-validated over groups.")
    bench.add_argument("data", nargs="*", help=".zarr stores or .h5ad tables (with image features or images)")
    bench.add_argument("--her2st", default=None, metavar="DIR", help="add the Her2ST sections in DIR")
    bench.add_argument("--hest", default=None, metavar="ROOT", help="add HEST-1k samples from ROOT")
    bench.add_argument("--hest-ids", nargs="+", default=None, metavar="ID")
    bench.add_argument("--out", required=True, help="result folder")
    bench.add_argument("--groupby", default="sample", help=".obs column held out together (default: sample)")
    bench.add_argument("--methods", nargs="+", default=None, help="default: all (see hst.tl.BENCHMARK_METHODS)")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--gene-sets", nargs="+", default=None, metavar="FLAVOR:N",
                       help="e.g. mean:250 hmhvg:300 (the default)")
    bench.add_argument("--normalized", action="store_true", help="library-size normalised targets")
    bench.add_argument("--fit-kwargs", default=None,
                       help='overrides of the HyperST fit: inline JSON (e.g. \'{"lr": 1e-4}\') or a .json file')
    bench.add_argument("--reference", default="hyperst", help="method the paired comparison is against")
    bench.add_argument("--metric", default="PCC@50", help="metric of the figure")
    bench.add_argument("--backbone", default=DEFAULT_BACKBONE, help="frozen backbone for missing features")
    bench.add_argument("--features-cache", default=None, metavar="H5AD", help="reuse/write the feature table")
    bench.add_argument("--table-key", default=None)
    bench.add_argument("--n-jobs", type=int, default=1, help="worker processes")
    bench.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    bench.add_argument("--overwrite", action="store_true")
    bench.add_argument("--progress", action="store_true")
    bench.set_defaults(func=_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyperst`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USER_ERROR
    try:
        return int(args.func(args))
    except (CLIError, *_USER_ERRORS) as err:
        if args.debug:
            raise
        print(f"hyperst: error: {_one_line(err)}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
