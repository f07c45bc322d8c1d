"""Package layout, lazy imports, settings and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hyperst as hst
from hyperst import cli
from hyperst._constants import Key


def test_import_is_lazy() -> None:
    code = (
        "import sys, hyperst as hst; "
        "heavy = [m for m in ('torch', 'spatialdata', 'squidpy', 'timm', 'scanpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pp_niches_imports_neither_torch_nor_numba() -> None:
    code = (
        "import sys, anndata as ad, numpy as np, pandas as pd\n"
        "import hyperst.pp\n"
        "assert 'torch' not in sys.modules and 'numba' not in sys.modules, 'import hyperst.pp'\n"
        "rng = np.random.default_rng(0)\n"
        "r, c = np.meshgrid(np.arange(6), np.arange(6), indexing='ij')\n"
        "obs = pd.DataFrame(index=[str(i) for i in range(36)])\n"
        "a = ad.AnnData(rng.poisson(3.0, (36, 5)).astype(np.float32), obs=obs)\n"
        "a.obsm['spatial'] = np.c_[c.ravel() * 200.0, r.ravel() * 200.0]\n"
        "hyperst.pp.niches(a)\n"
        "print(','.join(m for m in ('torch', 'numba', 'timm', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_pp_names_are_lazy_and_reachable() -> None:
    import hyperst.data
    import hyperst.pp

    assert set(hyperst.pp.__all__) <= set(hyperst.pp._LAZY_IMPORTS)
    for name in hyperst.pp.__all__:
        assert getattr(hyperst.pp, name) is not None
    # the torch-side names live in hyperst.data and are the same objects
    for name in ("SpotCropDataset", "CropCache", "dihedral"):
        assert getattr(hyperst.pp, name) is getattr(hyperst.data, name)
    assert hyperst.pp.LAYOUTS["visium"] == {"spot_diameter": 55.0, "pitch": 100.0}
    assert hyperst.pp.LAYOUTS["st"] == {"spot_diameter": 100.0, "pitch": 200.0}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hyperst.pp.nope  # noqa: B018


def test_subpackages_are_reachable() -> None:
    for name in ("pp", "tl", "pl", "datasets", "geometry", "nn"):
        assert getattr(hst, name).__name__ == f"hyperst.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hst.nope  # noqa: B018
    assert hst.__version__


def test_settings_verbosity() -> None:
    old = hst.settings.verbosity
    try:
        hst.settings.verbosity = "info"
        assert hst.settings.verbosity == 2
        hst.settings.verbosity = 4
        assert hst.settings.verbosity.name == "debug"
        with pytest.raises(ValueError, match="verbosity"):
            hst.settings.verbosity = "loud"
        with pytest.raises(ValueError, match="verbosity"):
            hst.settings.verbosity = 9
    finally:
        hst.settings.verbosity = old


def test_constants_are_unique() -> None:
    values = [v for k, v in vars(Key).items() if k.isupper() and not k.startswith("UNS_")]
    assert len(values) == len(set(values))


def test_cli_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert hst.__version__ in capsys.readouterr().out
    args = cli.build_parser().parse_args(["fit", "a.zarr", "b.zarr", "--out", "m", "--mode", "lora", "--epochs", "3"])
    assert (args.data, args.mode, args.epochs) == (["a.zarr", "b.zarr"], "lora", 3)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "a.zarr"])  # --out is required
