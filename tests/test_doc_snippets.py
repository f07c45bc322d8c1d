"""Every ```python block of README.md and docs/*.md runs.

How the documentation is tested (read this before writing a code block in README.md or docs/*.md):

- **One page, one test.** The ```python blocks of a page run in order, in one namespace, in a fresh
  temporary working directory ``<tmp>/project`` next to a link ``<tmp>/shared`` to the project's
  ``../shared``, so a path written ``"../shared/data/her2st"`` works exactly as in a checkout. Pages:
  README.md and docs/*.md (not docs/generated, not the notebooks under docs/tutorials/).
- **Shared data.** A page whose code reads ``../shared/data/<name>`` is skipped when that folder is
  absent. Everything else runs on synthetic data (``hst.datasets.synthetic``), with tiny sizes and few
  epochs so that the whole file stays near a minute on two CPU cores.
- **Opting a block out** (sparingly: code that needs a GPU, network/hub weights, or files nobody has):
  put ``<!-- no-test: reason -->`` on the line just before the opening fence (blank lines allowed).
  Blocks in another language (```bash, ```text, …) never run.
- **Set-up the reader does not need to see**, in HTML comments (hidden on GitHub and in Sphinx):

  - ``<!-- test-setup: trained -->`` before the first block puts the names of a shared tiny trained
    model into the page's namespace (see :func:`trained`): ``hst``, ``np``, ``sdata``, ``table``,
    ``train``, ``train_table``, ``held_out`` (= ``test``), ``genes``, ``model``, ``pred``, ``res``, ``he_rgb``.
    ``PAGE_SETUP`` below does the same for pages whose owners have not added the comment yet.
  - a comment whose first line is ``<!-- test-setup`` and whose following lines, up to ``-->``, are Python
    runs at that place of the page, like a visible block.

- Matplotlib draws with the Agg backend and every figure is closed after each block; ``show=True`` is
  harmless.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(.+?)\s*-->\s*$")
SETUP_NAMES = re.compile(r"^\s*<!--\s*test-setup:\s*([\w ,]+?)\s*-->\s*$")
SETUP_OPEN = re.compile(r"^\s*<!--\s*test-setup\s*$")
SHARED_PATH = re.compile(r"\.\./shared/data/([\w.\-]+)")
#: Pages that read shared data and take longer than a few seconds.
SLOW_PAGES = {"README.md"}
#: Set-up fixtures of pages that do not name them in a ``<!-- test-setup: … -->`` comment (yet).
PAGE_SETUP = {"docs/api.md": ["trained"], "docs/plotting.md": ["trained"]}


@dataclass
class Block:
    """One piece of Python of a page: its code, first line (1-based) and whether it is hidden set-up."""

    code: str
    line: int
    hidden: bool = False


@dataclass
class Page:
    """The runnable content of one Markdown page."""

    blocks: list[Block] = field(default_factory=list)
    fixtures: list[str] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of opted-out blocks


def parse(text: str) -> Page:
    """The runnable blocks of a Markdown page, its fixtures and its opted-out blocks (see the module doc)."""
    page = Page()
    lines = text.splitlines()
    i = 0
    last_comment: str | None = None  # the last non-blank line before a fence, if it was a no-test comment
    while i < len(lines):
        line = lines[i]
        if m := SETUP_NAMES.match(line):
            page.fixtures += [n.strip() for n in m.group(1).split(",") if n.strip()]
        elif SETUP_OPEN.match(line):
            end = next(j for j in range(i + 1, len(lines)) if "-->" in lines[j])
            page.blocks.append(Block("\n".join(lines[i + 1 : end]), i + 2, hidden=True))
            i = end
        elif m := FENCE.match(line):
            indent, fence, lang = m.groups()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().rstrip("`~") == ""
                        and lines[j].strip().startswith(fence)), len(lines))
            if lang == "python":
                code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : end])
                if last_comment is not None:
                    page.skipped.append((i + 1, last_comment))
                else:
                    page.blocks.append(Block(code, i + 2))
            i = end
        if line.strip():
            m = NO_TEST.match(line)
            last_comment = m.group(1) if m else None
        i += 1
    return page


def test_parser_rules() -> None:
    text = "\n".join([
        "<!-- test-setup: trained -->",
        "```python", "a = 1", "```",
        "<!-- no-test: needs a GPU -->", "",
        "```python", "raise SystemExit", "```",
        "```bash", "rm -rf /", "```",
        "<!-- test-setup", "b = a + 1", "-->",
        "````python", "```", "c = b", "````",
    ])
    page = parse(text)
    assert page.fixtures == ["trained"]
    assert [(b.code, b.line, b.hidden) for b in page.blocks] == [("a = 1", 3, False), ("b = a + 1", 14, True),
                                                                 ("```\nc = b", 17, False)]
    assert page.skipped == [(7, "needs a GPU")]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def trained() -> dict[str, Any]:
    """A tiny trained model on synthetic data, for pages that show what to do with one.

    Four synthetic slides of 6 × 6 spots and 36 genes whose image features are a random embedding of each
    spot's tissue type plus noise (no backbone run, so it takes seconds), an ensemble fitted on
    ``sample0``–``sample2`` for a few epochs, its prediction of ``sample3`` (``held_out``, also ``test``), the
    evaluation, and the held-out H&E as an ``(y, x, rgb)`` array (``he_rgb``; spot coordinates are its pixels).
    """
    import pandas as pd
    import torch

    import hyperst as hst
    from hyperst._constants import Key

    torch.set_num_threads(1)
    sdata = hst.datasets.synthetic(n_samples=4, n_rows=6, n_cols=6, n_genes=36, seed=0)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    onehot = pd.get_dummies(table.obs[Key.OBS_TISSUE]).to_numpy(np.float32)
    feats = onehot @ rng.normal(size=(onehot.shape[1], 16)) + 0.1 * rng.normal(size=(table.n_obs, 16))
    table.obsm[Key.OBSM_FEATURES_SPOT] = feats.astype(np.float32)
    table.obsm[Key.OBSM_FEATURES_NICHE] = feats.astype(np.float32)
    train = table[table.obs["sample"] != "sample3"].copy()
    held_out = table[table.obs["sample"] == "sample3"].copy()
    genes = list(map(str, train.var_names))
    model = hst.tl.fit(train, genes=genes, config={"emb_dim": 16}, max_epochs=5, lr=1e-3, batch_size=32,
                       progress=False)
    pred = hst.tl.predict(model, held_out)
    res = hst.tl.evaluate(held_out, pred)
    he_rgb = np.moveaxis(np.asarray(sdata.images["sample3_image"].values), 0, -1)
    return {"sdata": sdata, "table": table, "train": train, "train_table": train, "held_out": held_out,
            "test": held_out, "genes": genes, "model": model, "pred": pred, "res": res, "he_rgb": he_rgb}


def _namespace(request: pytest.FixtureRequest, fixtures: list[str]) -> dict[str, Any]:
    import hyperst as hst

    ns: dict[str, Any] = {"__name__": "__doc_snippet__"}
    for name in fixtures:
        if name != "trained":
            raise ValueError(f"unknown test-setup fixture {name!r}; known: 'trained'")
        shared = request.getfixturevalue(name)
        ns.update({"hst": hst, "np": np})
        # objects a page may change are copied; the model is shared (pages only read or save it)
        ns.update({k: (v.copy() if hasattr(v, "copy") and k not in ("model", "res", "sdata") else v)
                   for k, v in shared.items()})
    return ns


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """``<tmp>/project`` as the working directory, with ``<tmp>/shared`` linked to the project's ``../shared``."""
    project = tmp_path / "project"
    project.mkdir()
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    old = Path.cwd()
    os.chdir(project)
    try:
        yield project
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------------------------ the pages
def _params() -> list[Any]:
    return [pytest.param(p, id=p, marks=[pytest.mark.slow] if p in SLOW_PAGES else []) for p in PAGES]


@pytest.mark.parametrize("page_path", _params())
def test_page_runs(page_path: str, workdir: Path, request: pytest.FixtureRequest) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    page = parse((ROOT / page_path).read_text())
    if not page.blocks:
        pytest.skip(f"{page_path} has no Python block to run")
    code = "\n".join(b.code for b in page.blocks)
    missing = sorted({m for m in SHARED_PATH.findall(code) if not (SHARED / "data" / m).exists()})
    if missing:
        pytest.skip(f"{page_path} reads ../shared/data/{missing[0]}, which is absent")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns = _namespace(request, page.fixtures or PAGE_SETUP.get(page_path, []))
        for block in page.blocks:
            t = time.perf_counter()
            try:
                exec(compile("\n" * (block.line - 1) + block.code, str(ROOT / page_path), "exec"), ns)
            except Exception as err:  # name the page and line in the failure, keep the traceback
                kind = "hidden set-up" if block.hidden else "block"
                raise AssertionError(f"{page_path}: the {kind} at line {block.line} fails: {err!r}") from err
            finally:
                plt.close("all")
            print(f"{page_path}:{block.line} {time.perf_counter() - t:.1f} s")
    finally:
        torch.set_num_threads(threads)


def test_readme_commands_are_the_brief() -> None:
    """The two set-up commands of the README stay as CI and the brief expect them."""
    text = (ROOT / "README.md").read_text()
    for marker, command in [
        ("<!-- main-command -->", "python3 -m pip install -c constraints.txt . && hyperst demo"),
        ("<!-- test-command -->", 'python3 -m pip install -c constraints.txt -e ".[test]" && python3 -m pytest'),
    ]:
        after = text.split(marker, 1)[1].lstrip()
        assert after.startswith(f"```bash\n{command}\n```"), marker
