"""The jobs of :func:`hyperst.tl.benchmark` and the processes that run them.

One :class:`Job` is one (gene set, fold, seed); :class:`Shared` is what every job needs (sent once to each
worker process). :func:`run_jobs` runs a job function over the jobs, in this process or in a pool of
spawned worker processes, and hands freed memory back to the OS after each job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hyperst._utils import release_memory

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from hyperst.tl._benchmark_methods import BenchmarkMethod

__all__ = ["Job", "JobResult", "Shared", "run_jobs"]

#: What a job returns: score rows, timing rows, and the job's record (groups, spot counts, choices).
JobResult = tuple[list[dict], list[dict], dict]


@dataclass
class Job:
    """One (gene set, fold, seed) of a benchmark: its genes and the held-out, validation and fitting groups."""

    gene_set: str
    genes: list[str]
    fold: str
    test_groups: list[str]
    val_groups: list[str]
    fit_groups: list[str]
    seed: int


@dataclass
class Shared:
    """What every job needs; sent once to each worker process."""

    table: AnnData
    groupby: str
    sample_key: str
    spot_key: str
    niche_key: str
    layer: str | None
    normalize: bool
    methods: list[BenchmarkMethod]
    ks: list[int]
    fit_kwargs: dict[str, Any]
    threads: int | None = None
    #: shift name → (spot features, niche features or None, rows covered), over the rows of ``table``
    shifts: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    #: names of the augmented views every method trains on (``None``: clean features only)
    views: list[str] | None = None


_WORKER: dict[str, Any] = {}


def _init_worker(run: Callable[[Job, Shared], JobResult], shared: Shared) -> None:
    import torch

    if shared.threads is not None:
        torch.set_num_threads(shared.threads)
    import hyperst

    hyperst.settings.verbosity = 1  # warnings only inside workers
    _WORKER["run"] = run
    _WORKER["shared"] = shared


def _run_in_worker(job: Job) -> JobResult:
    try:
        return _WORKER["run"](job, _WORKER["shared"])
    finally:
        release_memory()


def run_jobs(
    run: Callable[[Job, Shared], JobResult],
    jobs: Sequence[Job],
    shared: Shared,
    *,
    n_jobs: int = 1,
    progress: bool = True,
) -> list[JobResult]:
    """``run(job, shared)`` for every job, in order.

    Parameters
    ----------
    run
        The job function; a module-level function (worker processes import it by name).
    jobs
        The jobs.
    shared
        What every job needs. ``shared.threads`` sets the torch threads per job (``None``: unchanged).
    n_jobs
        ``1``: run in this process. More: that many worker processes (spawned: torch and fork do not mix);
        each job runs in one process, so the results do not depend on ``n_jobs``.
    progress
        Show a progress bar over jobs.

    Returns
    -------
    The results of ``run``, in the order of ``jobs``.
    """
    from tqdm.auto import tqdm

    results: list[JobResult] = []
    pbar = tqdm(total=len(jobs), disable=not progress, desc="benchmark", unit="job")
    if n_jobs == 1:
        import torch

        old = torch.get_num_threads()
        if shared.threads is not None:
            torch.set_num_threads(shared.threads)
        try:
            for job in jobs:
                results.append(run(job, shared))
                release_memory()
                pbar.update(1)
        finally:
            torch.set_num_threads(old)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(run, shared)) as pool:
            for res in pool.map(_run_in_worker, jobs):
                results.append(res)
                pbar.update(1)
    pbar.close()
    return results
