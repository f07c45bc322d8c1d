"""Sphinx configuration of the hyperst documentation (build: sphinx-build -W -b html docs docs/_build/html)."""

from __future__ import annotations

import shutil
from importlib.metadata import version as _version
from pathlib import Path

# The executed tutorials live in ../tutorials (outputs committed); Sphinx reads copies (not executed).
_HERE = Path(__file__).resolve().parent
(_HERE / "tutorials").mkdir(exist_ok=True)
for _nb in sorted((_HERE.parent / "tutorials").glob("*.ipynb")):
    shutil.copy2(_nb, _HERE / "tutorials" / _nb.name)

project = "hyperst"
author = "hyperst developers"
copyright = "2026, hyperst developers"
release = _version("hyperst")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_custom_sections = [("Numerical notes", "notes_style")]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
nb_execution_mode = "off"  # notebooks are executed with outputs committed

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# Offline builds: no intersphinx inventories are fetched.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "furo"
html_title = "hyperst"
html_static_path = ["_static"]

nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type"]
