"""Tools: the :class:`HyperST` model and its scanpy-style wrappers, evaluation and benchmarks.

:class:`HyperST` owns the life cycle (``setup`` → ``train`` → ``predict`` / ``get_embeddings`` →
``save`` / ``load``); :func:`fit` and :func:`predict` wrap it for one-line use. Option groups
(:class:`TrainOptions`, :class:`TrainerOptions`, :class:`DataOptions`, :class:`ImageOptions`) keep the
many training settings apart by concern.
"""

from hyperst.data._modules import spatial_block_split
from hyperst.tl._benchmark import BENCHMARK_METHODS, BenchmarkMethod, BenchmarkResult, benchmark
from hyperst.tl._cohort import predict_cohort
from hyperst.tl._cv import cross_validate
from hyperst.tl._evaluate import Evaluation, evaluate, pcc_at_k, pearson_per_gene
from hyperst.tl._fit import fit
from hyperst.tl._lora import LoraSpec
from hyperst.tl._model import HyperST
from hyperst.tl._options import DataOptions, ImageOptions, TrainerOptions, TrainOptions
from hyperst.tl._predict import predict

__all__ = [
    "BENCHMARK_METHODS",
    "BenchmarkMethod",
    "BenchmarkResult",
    "DataOptions",
    "Evaluation",
    "HyperST",
    "ImageOptions",
    "LoraSpec",
    "TrainOptions",
    "TrainerOptions",
    "benchmark",
    "cross_validate",
    "evaluate",
    "fit",
    "pcc_at_k",
    "pearson_per_gene",
    "predict",
    "predict_cohort",
    "spatial_block_split",
]
