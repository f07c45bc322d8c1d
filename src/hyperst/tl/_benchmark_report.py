"""The report of :func:`hyperst.tl.benchmark`: its result and the Markdown helpers of the benchmark scripts.

:class:`BenchmarkResult` holds the tidy scores and timings and summarises, compares (paired over folds),
writes Markdown, plots, saves and loads them; :func:`compare_markdown` and :func:`best_baseline` serve the
CLI and ``benchmarks/her2st.py``. :func:`write_html_report` writes the self-contained ``index.html`` of a
report folder (the benchmark's and the demo's): tables, every figure embedded with its caption, and the
command that made it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hyperst._utils import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["BenchmarkResult", "best_baseline", "command_line", "compare_markdown", "write_html_report"]


@dataclass
class BenchmarkResult:
    """Scores and timings of :func:`benchmark`.

    Attributes
    ----------
    scores
        Tidy scores: ``gene_set``, ``method``, ``fold``, ``seed``, ``scope`` (``"pooled"``, each held-out
        slide, ``"mean_over_slides"`` when a fold holds out several), ``metric`` (``PCC@K``, ``MSE``, ``MAE``,
        ``n_spots``) and ``value``.
    timings
        One row per gene set, method, fold and seed: ``fit_s``, ``predict_s`` and their sum ``total_s`` (seconds;
        scoring excluded).
    meta
        Settings (methods, folds, gene sets, seeds, fit options), total wall time, and one record per job
        (validation groups, spot counts, genes, and what each method chose: epochs, α, k).
    shift_scores
        With ``benchmark(shifts=...)``: the scores of the held-out spots as each shift shows them, with the
        columns of :attr:`scores` plus ``shift``; else ``None``.
    """

    scores: pd.DataFrame
    timings: pd.DataFrame
    meta: dict[str, Any]
    shift_scores: pd.DataFrame | None = None

    # ------------------------------------------------------------------ tables
    @property
    def methods(self) -> list[str]:
        """Methods in the order they were run."""
        return list(self.meta["methods"])

    def _select(self, metric: str, scope: str, gene_set: str | None) -> pd.DataFrame:
        df = self.scores
        df = df[(df["metric"] == metric) & (df["scope"] == scope)]
        if gene_set is not None:
            if gene_set not in set(self.scores["gene_set"]):
                raise ValueError(f"Unknown `gene_set` {gene_set!r}; have {sorted(set(self.scores['gene_set']))}.")
            df = df[df["gene_set"] == gene_set]
        if df.empty:
            raise ValueError(f"No scores for metric {metric!r} in scope {scope!r}.")
        return df

    def summary(self, metrics: Sequence[str] | None = None, *, scope: str = "pooled") -> pd.DataFrame:
        """Mean and standard deviation over folds × seeds.

        Parameters
        ----------
        metrics
            Metrics to include (default PCC@K for each K, MSE, MAE).
        scope
            ``"pooled"`` (the held-out spots of each fold) or ``"mean_over_slides"``.

        Returns
        -------
        Rows ``(gene_set, method)`` in run order; columns ``(metric, "mean" | "std")``.
        """
        have = list(dict.fromkeys(self.scores["metric"]))
        metrics = [m for m in (metrics or [*(f"PCC@{k}" for k in self.meta["ks"]), "MSE", "MAE"]) if m in have]
        df = self.scores[(self.scores["scope"] == scope) & self.scores["metric"].isin(metrics)]
        out = df.groupby(["gene_set", "method", "metric"], sort=False)["value"].agg(["mean", "std"]).unstack("metric")
        out = out.swaplevel(axis=1)[[(m, s) for m in metrics for s in ("mean", "std")]]
        order = [(g, m) for g in dict.fromkeys(self.scores["gene_set"]) for m in self.methods if (g, m) in out.index]
        return out.loc[order]

    def per_slide(self, metric: str = "PCC@50", *, gene_set: str | None = None) -> pd.DataFrame:
        """``metric`` on each held-out slide (mean over seeds): rows ``(gene_set, method)``, one column per slide."""
        df = self.scores[(self.scores["metric"] == metric)
                         & ~self.scores["scope"].isin(["pooled", "mean_over_slides"])]
        if gene_set is not None:
            df = df[df["gene_set"] == gene_set]
        out = df.groupby(["gene_set", "method", "scope"], sort=False)["value"].mean().unstack("scope")
        order = [(g, m) for g in dict.fromkeys(df["gene_set"]) for m in self.methods if (g, m) in out.index]
        return out.loc[order]

    def fold_means(self, metric: str = "PCC@50", *, scope: str = "pooled") -> pd.DataFrame:
        """``metric`` per fold averaged over seeds: rows ``(gene_set, fold)``, one column per method."""
        df = self._select(metric, scope, None)
        out = df.groupby(["gene_set", "fold", "method"], sort=False)["value"].mean().unstack("method")
        return out[[m for m in self.methods if m in out.columns]]

    def compare(
        self,
        reference: str = "hyperst",
        *,
        metric: str = "PCC@50",
        scope: str = "pooled",
        alpha: float = 0.05,
    ) -> pd.DataFrame:
        """Paired comparison of every method with ``reference``, fold by fold.

        Seeds are averaged within each fold first (they share the fold's data, so they are not independent);
        the folds are the paired units. For each method and gene set: the mean difference (method −
        reference) over folds, its standard deviation, the paired t statistic and two-sided p value over
        folds, the number of folds the method wins, and the seed-to-seed standard deviation of the difference
        (averaged over folds) for scale. ``exceeds_noise`` is ``p < alpha``: the difference is larger than the
        fold-to-fold variation of the difference explains. With five folds this needs a consistent
        difference; a non-significant result means "not shown", not "equal".

        Parameters
        ----------
        reference
            Method every other method is compared with.
        metric
            Metric compared (higher is better for PCC, lower for MSE/MAE).
        scope
            ``"pooled"`` or ``"mean_over_slides"``.
        alpha
            Significance level of ``exceeds_noise``.

        Returns
        -------
        One row per ``(gene_set, method)``: ``reference``, ``mean_diff``, ``sd_diff``, ``t``, ``p``,
        ``wins`` (folds where the method is better), ``n_folds``, ``seed_sd`` and ``exceeds_noise``.
        """
        from scipy import stats

        if reference not in self.methods:
            raise ValueError(f"`reference` {reference!r} was not run; methods: {self.methods}.")
        df = self._select(metric, scope, None)
        higher_better = metric.startswith("PCC")
        rows = []
        for gene_set, sub in df.groupby("gene_set", sort=False):
            wide = sub.pivot_table(index=["fold", "seed"], columns="method", values="value")
            folds = wide.groupby(level="fold", sort=False).mean()
            for method in self.methods:
                if method == reference or method not in folds.columns:
                    continue
                d = (folds[method] - folds[reference]).to_numpy()
                per_seed = (wide[method] - wide[reference]).groupby(level="fold").std(ddof=1)
                n = len(d)
                sd = float(np.std(d, ddof=1)) if n > 1 else float("nan")
                if n > 1 and sd > 0:
                    t = float(np.mean(d) / (sd / np.sqrt(n)))
                    p = float(2 * stats.t.sf(abs(t), df=n - 1))
                else:
                    t = p = float("nan")
                better = d > 0 if higher_better else d < 0
                rows.append({
                    "gene_set": gene_set, "method": method, "reference": reference, "metric": metric,
                    "mean_diff": float(np.mean(d)), "sd_diff": sd, "t": t, "p": p,
                    "wins": int(better.sum()), "n_folds": n,
                    "seed_sd": float(per_seed.mean()) if per_seed.notna().any() else float("nan"),
                    "exceeds_noise": bool(np.isfinite(p) and p < alpha),
                })
        return pd.DataFrame(rows).set_index(["gene_set", "method"])

    def shift_summary(
        self, metric: str = "PCC@50", *, scope: str = "pooled", gene_set: str | None = None, delta: bool = False
    ) -> pd.DataFrame:
        """``metric`` per method (rows) and shift (columns, ``"clean"`` first): mean over folds × seeds.

        Parameters
        ----------
        metric, scope, gene_set
            Which score (see :attr:`scores`); ``gene_set=None``: all gene sets pooled.
        delta
            Report each shift as its difference from the clean score (shifted − clean).
        """
        if self.shift_scores is None or not len(self.shift_scores):
            raise ValueError("This result has no shifted scores: run `benchmark(..., shifts={...})`.")
        clean = self._select(metric, scope, gene_set).assign(shift="clean")
        sh = self.shift_scores
        sh = sh[(sh["metric"] == metric) & (sh["scope"] == scope)]
        if gene_set is not None:
            sh = sh[sh["gene_set"] == gene_set]
        both = pd.concat([clean, sh], ignore_index=True)
        order = ["clean", *dict.fromkeys(sh["shift"])]
        wide = both.pivot_table(index="method", columns="shift", values="value", aggfunc="mean")
        wide = wide.reindex(index=[m for m in self.methods if m in wide.index], columns=order)
        if delta:
            wide = wide.sub(wide["clean"], axis=0).drop(columns="clean")
        wide.columns.name = None
        return wide

    def timing_summary(self) -> pd.DataFrame:
        """Mean seconds per job (one fold × gene set × seed) for each method: fit, predict and total."""
        out = self.timings.groupby("method", sort=False)[["fit_s", "predict_s", "total_s"]].mean()
        return out.loc[[m for m in self.methods if m in out.index]]

    # ------------------------------------------------------------------ report
    def to_markdown(self, *, scope: str = "pooled", digits: int = 3) -> str:
        """The summary as a Markdown table (``mean ± std`` over folds × seeds), one block per gene set."""
        summ = self.summary(scope=scope)
        metrics = list(dict.fromkeys(summ.columns.get_level_values(0)))
        lines = []
        for gene_set in dict.fromkeys(summ.index.get_level_values(0)):
            lines += [f"**Gene set `{gene_set}`**", "", "| method | " + " | ".join(metrics) + " |",
                      "|---|" + "---:|" * len(metrics)]
            sub = summ.loc[gene_set]
            best = {m: (sub[(m, "mean")].max() if m.startswith("PCC") else sub[(m, "mean")].min()) for m in metrics}
            for method, row in sub.iterrows():
                cells = []
                for m in metrics:
                    mean, sd = row[(m, "mean")], row[(m, "std")]
                    txt = f"{mean:.{digits}f} ± {0.0 if np.isnan(sd) else sd:.{digits}f}"
                    cells.append(f"**{txt}**" if np.isclose(mean, best[m]) else txt)
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def plot(
        self,
        metric: str = "PCC@50",
        *,
        scope: str = "pooled",
        gene_sets: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        figsize: tuple[float, float] | None = None,
    ) -> Figure:
        """Per-method ``metric``: one dot per fold (mean over seeds), mean ± std over folds × seeds.

        Parameters
        ----------
        metric
            Metric to plot.
        scope
            ``"pooled"`` or ``"mean_over_slides"``.
        gene_sets
            Gene sets to show (one panel each); default all.
        methods
            Methods to show, in this order. Default: all, except the mean predictor for PCC metrics (its
            correlations are 0 by construction and would squeeze the axis; the title says so).
        figsize
            Figure size; default scales with the number of methods.

        Returns
        -------
        The matplotlib figure.
        """
        import matplotlib.pyplot as plt

        df = self._select(metric, scope, None)
        sets = list(gene_sets or dict.fromkeys(df["gene_set"]))
        dropped = []
        if methods is None:
            methods = [m for m in self.methods if m in set(df["method"])]
            if metric.startswith("PCC") and "mean" in methods and len(methods) > 1:
                methods.remove("mean")
                dropped.append("mean")
        else:
            methods = [str(m) for m in methods]
            unknown = [m for m in methods if m not in set(df["method"])]
            if unknown:
                raise ValueError(f"`methods` {unknown} have no {metric!r} scores; have {sorted(set(df['method']))}.")
        folds = list(dict.fromkeys(df["fold"]))
        colours = plt.get_cmap("tab10")
        groups = self.meta.get("groups", {})
        fig, axes = plt.subplots(1, len(sets), sharey=True, squeeze=False,
                                 figsize=figsize or (4.2 * len(sets) + 1.5, 0.38 * len(methods) + 1.4))
        y = np.arange(len(methods))[::-1]
        for ax, gene_set in zip(axes[0], sets, strict=True):
            sub = df[df["gene_set"] == gene_set]
            for yi, method in zip(y, methods, strict=True):
                vals = sub[sub["method"] == method]
                mean, sd = vals["value"].mean(), vals["value"].std(ddof=1)
                face = {"hyperst": "C3", "ablation": "0.35", "baseline": "C0"}.get(groups.get(method, ""), "k")
                ax.errorbar(mean, yi, xerr=0 if np.isnan(sd) else sd, fmt="D", color=face, ms=6, capsize=3, zorder=3)
                per_fold = vals.groupby("fold", sort=False)["value"].mean()
                for fi, fold in enumerate(folds):
                    if fold in per_fold.index:
                        ax.scatter(per_fold[fold], yi + 0.22, s=12, color=colours(fi % 10), zorder=2,
                                   label=fold if yi == y[0] else None)
            ax.set_title(f"{metric} ({scope}), genes: {gene_set}", fontsize=10)
            ax.set_xlabel(metric + (" (mean predictor: 0, not shown)" if dropped else ""))
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(y, methods)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, min(0.3, 0.5 / fig.get_figheight()), 1, 1))  # ~0.5 in for the legend
        fig.legend(handles, labels, title="held-out fold (mean over seeds); ◆ mean ± std over folds × seeds",
                   fontsize=8, title_fontsize=8, loc="lower center", ncol=max(1, len(folds)), frameon=False)
        return fig

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        path: str | Path,
        *,
        overwrite: bool = False,
        html: bool = True,
        metric: str = "PCC@50",
        reference: str | None = None,
        command: str | None = None,
    ) -> Path:
        """Write ``scores.csv``, ``timings.csv`` and ``meta.json`` into the folder ``path``, and a report page.

        With ``html=True`` the folder also gets ``scores.png`` (:meth:`plot` of ``metric``) and a
        self-contained ``index.html`` (:func:`write_html_report`): the summary table, the paired comparison
        with ``reference`` (default ``"hyperst"`` when it was run, else the first method), the timings, the
        figure, and ``command`` (default: the command line of this process).
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass `overwrite=True`.")
        path.mkdir(parents=True, exist_ok=True)
        self.scores.to_csv(path / "scores.csv", index=False)
        self.timings.to_csv(path / "timings.csv", index=False)
        if self.shift_scores is not None:
            self.shift_scores.to_csv(path / "shift_scores.csv", index=False)
        (path / "meta.json").write_text(json.dumps(jsonable(self.meta), indent=1) + os.linesep)
        if html:
            self._write_html(path, metric=metric, reference=reference, command=command)
        return path

    def _write_html(self, path: Path, *, metric: str, reference: str | None, command: str | None) -> None:
        import matplotlib.pyplot as plt

        have = list(dict.fromkeys(self.scores["metric"]))
        if metric not in have:  # e.g. PCC@5 only: show the first correlation metric scored
            metric = next((m for m in have if m.startswith("PCC")), have[0])
        tables: list[tuple[str, pd.DataFrame]] = []
        summ = self.summary()
        wide = pd.DataFrame({m: [f"{a:.3f} ± {0.0 if np.isnan(b) else b:.3f}" for a, b in
                                 zip(summ[(m, "mean")], summ[(m, "std")], strict=True)]
                             for m in dict.fromkeys(summ.columns.get_level_values(0))}, index=summ.index)
        tables.append(("Scores on the held-out groups: mean ± std over folds × seeds (pooled over spots). "
                       "Higher PCC@K is better, lower MSE/MAE is better.", wide))
        figures: list[tuple[str, str]] = []
        fig = self.plot(metric)
        fig.savefig(path / "scores.png", dpi=110)
        plt.close(fig)
        figures.append(("scores.png", f"{metric} per method: each dot is one held-out fold (mean over seeds), the "
                        "diamond the mean ± std over folds × seeds. Look for methods whose diamonds are apart by more "
                        "than the spread of their dots."))
        ref = reference or ("hyperst" if "hyperst" in self.methods else self.methods[0])
        if len(self.methods) > 1:
            cmp = self.compare(ref, metric=metric).drop(columns=["reference", "metric"], errors="ignore")
            tables.append((f"Paired comparison of {metric} with `{ref}` over folds (method − {ref}): "
                           "mean difference, t, p, folds won. 'exceeds_noise' says whether the difference is "
                           "larger than the seed-to-seed spread.", cmp))
        if self.shift_scores is not None and len(self.shift_scores):
            for m, what in ((metric, "higher is better"), ("MSE", "lower is better")):
                tables.append((f"{m} of the held-out groups clean and under each domain shift (mean over folds × "
                               f"seeds; {what}).", self.shift_summary(m).round(3)))
        timing = self.timings.groupby("method", sort=False)[["fit_s", "predict_s", "total_s"]].mean().round(2)
        tables.append(("Mean seconds per job (fit, predict; scoring excluded).", timing))
        keys = ("methods", "folds", "seeds", "gene_sets", "shifts", "views")
        settings = {k: self.meta[k] for k in keys if self.meta.get(k)}
        write_html_report(
            path,
            title="hyperst benchmark",
            command=command or command_line(),
            summary=f"{len(self.methods)} methods, {self.scores['fold'].nunique()} folds, "
                    f"{self.scores['seed'].nunique()} seed(s), gene sets {sorted(set(self.scores['gene_set']))}.",
            tables=tables,
            figures=figures,
            details={"settings": settings},
            files=["scores.csv", "timings.csv", "meta.json",
                   *(["shift_scores.csv"] if self.shift_scores is not None else [])],
        )

    @classmethod
    def load(cls, path: str | Path) -> BenchmarkResult:
        """Read a result written by :meth:`save`."""
        path = Path(path)
        missing = [f for f in ("scores.csv", "timings.csv", "meta.json") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved benchmark result: missing {missing}.")
        str_cols = {"gene_set": str, "method": str, "fold": str, "scope": str, "metric": str}
        scores = pd.read_csv(path / "scores.csv", dtype=str_cols)
        timings = pd.read_csv(path / "timings.csv", dtype={k: str for k in ("gene_set", "method", "fold")})
        shifted = path / "shift_scores.csv"
        shift_scores = pd.read_csv(shifted, dtype={**str_cols, "shift": str}) if shifted.is_file() else None
        return cls(scores=scores, timings=timings, meta=json.loads((path / "meta.json").read_text()),
                   shift_scores=shift_scores)


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def compare_markdown(table: pd.DataFrame, *, digits: int = 3) -> str:
    """A :meth:`BenchmarkResult.compare` table as Markdown (one block per gene set)."""
    lines = []
    for gene_set in dict.fromkeys(table.index.get_level_values(0)):
        sub = table.loc[gene_set]
        ref = sub["reference"].iloc[0]
        metric = sub["metric"].iloc[0]
        lines += [f"**Gene set `{gene_set}`: {metric}, method − `{ref}`, paired over folds**", "",
                  "| method | mean diff | sd over folds | t | p | folds won | seed sd | beyond fold noise |",
                  "|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for method, row in sub.iterrows():
            lines.append(
                f"| `{method}` | {row['mean_diff']:+.{digits}f} | {_fmt(row['sd_diff'], digits)} | {_fmt(row['t'], 2)} "
                f"| {_fmt(row['p'], 3)} | {row['wins']}/{row['n_folds']} | {_fmt(row['seed_sd'], digits)} "
                f"| {'**yes**' if row['exceeds_noise'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def best_baseline(result: BenchmarkResult, *, metric: str = "PCC@50", gene_set: str | None = None) -> str:
    """The baseline (``group == "baseline"``) with the best mean ``metric`` over folds × seeds."""
    groups = result.meta.get("groups", {})
    base = [m for m in result.methods if groups.get(m) == "baseline" and m != "mean"]
    if not base:
        raise ValueError("The result has no baseline besides the mean predictor.")
    df = result._select(metric, "pooled", gene_set)
    means = df[df["method"].isin(base)].groupby("method")["value"].mean()
    return str(means.idxmax() if metric.startswith("PCC") else means.idxmin())


# ---------------------------------------------------------------------------------------------- html page
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
pre { background: #f4f4f4; padding: 0.6em 0.8em; overflow-x: auto; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0 2em; } figure img { max-width: 100%; max-height: 760px; border: 1px solid #ddd; }
figcaption { margin-top: 0.4em; color: #444; } .meta { color: #666; font-size: 0.9em; }
"""


def command_line() -> str:
    """The command line of this process as one shell-quoted string (``hyperst …`` for the console script)."""
    argv = list(sys.argv)
    first = Path(argv[0]) if argv else None
    if first is not None and (first.name == "hyperst" or first.parts[-2:] == ("hyperst", "__main__.py")):
        argv[0] = "hyperst"
    elif first is not None and (first.name.startswith("pytest") or first.parts[-2:] == ("pytest", "__main__.py")):
        argv[0] = "pytest"
    else:
        argv = ["python", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def _table_html(table: pd.DataFrame | Mapping[str, Any]) -> str:
    if isinstance(table, Mapping):
        cells = [f"{v:.3f}" if isinstance(v, float) else "–" if v is None else str(v) for v in table.values()]
        table = pd.DataFrame({"value": cells}, index=list(map(str, table.keys())))
    return table.to_html(border=0, float_format=lambda x: f"{x:.3f}", na_rep="–", escape=True)


def write_html_report(
    out: str | Path,
    *,
    title: str,
    command: str,
    summary: str = "",
    tables: Sequence[tuple[str, pd.DataFrame | Mapping[str, Any]]] = (),
    figures: Sequence[tuple[str, str]] = (),
    details: Mapping[str, Any] | None = None,
    files: Sequence[str] = (),
) -> Path:
    """Write ``out/index.html``: a self-contained page that a person opens in a browser, offline.

    Parameters
    ----------
    out
        The report folder (it must exist); figures are read from it.
    title
        Page title.
    command
        The command that made the report, shown at the top.
    summary
        One paragraph under the title.
    tables
        ``(caption, table)`` pairs: a DataFrame, or a mapping shown as a two-column table.
    figures
        ``(file name in out, one-line caption saying what to look for)``. Each existing figure is embedded
        as base64 (the page works when moved alone) and linked by its file name; a missing one is listed
        as missing.
    details
        Anything else to show as JSON under "Details".
    files
        Other files of the folder to link (e.g. ``metrics.json``), when they exist.

    Returns
    -------
    The path of ``index.html``.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"`out` {out} is not a folder; write the report files first.")
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} in {esc(str(out.resolve()))}</p>',
    ]
    if summary:
        parts.append(f"<p>{esc(summary)}</p>")
    parts += ["<h2>Command</h2>", f"<pre>{esc(command)}</pre>"]
    for caption, table in tables:
        parts += [f"<p>{esc(caption)}</p>", _table_html(table)]
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, caption in figures:
        f = out / name
        if not f.is_file():
            parts.append(f"<p><em>{esc(name)}</em> was not written: {esc(caption)}</p>")
            continue
        data = base64.b64encode(f.read_bytes()).decode("ascii")
        mime = "image/svg+xml" if f.suffix == ".svg" else "image/png"
        parts.append(
            f'<figure id="{esc(f.stem)}"><a href="{esc(name)}"><img src="data:{mime};base64,{data}" '
            f'alt="{esc(name)}"></a><figcaption><strong>{esc(name)}</strong>: {esc(caption)}</figcaption></figure>'
        )
    listed = [n for n in files if (out / n).is_file()]
    if listed:
        parts += ["<h2>Files</h2>", "<ul>", *[f'<li><a href="{esc(n)}">{esc(n)}</a></li>' for n in listed], "</ul>"]
    if details:
        parts += ["<h2>Details</h2>", f"<pre>{esc(json.dumps(jsonable(dict(details)), indent=1))}</pre>"]
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
