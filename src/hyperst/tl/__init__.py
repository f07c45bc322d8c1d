"""Tools: train (:func:`fit`), predict (:func:`predict`), evaluate (:func:`evaluate`) and persist HyperST.

:class:`HyperST` is the user-facing model (network + genes + backbone + crop geometry), saved with
:meth:`HyperST.save` and loaded with :meth:`HyperST.load`.
"""

from hyperst.tl._benchmark import BENCHMARK_METHODS, BenchmarkMethod, BenchmarkResult, benchmark
from hyperst.tl._cv import cross_validate
from hyperst.tl._evaluate import Evaluation, evaluate, pcc_at_k, pearson_per_gene
from hyperst.tl._fit import fit, predict
from hyperst.tl._lora import LoraSpec
from hyperst.tl._model import HyperST
from hyperst.tl._train import spatial_block_split

__all__ = [
    "BENCHMARK_METHODS",
    "BenchmarkMethod",
    "BenchmarkResult",
    "Evaluation",
    "HyperST",
    "LoraSpec",
    "benchmark",
    "cross_validate",
    "evaluate",
    "fit",
    "pcc_at_k",
    "pearson_per_gene",
    "predict",
    "spatial_block_split",
]
