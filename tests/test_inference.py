"""Inference speed paths of ``extract_features``: channels-last, compile, the reader thread, OOM back-off."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from torch import nn

from hyperst._utils import BatchSizer
from hyperst.pp import extract_features

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": None, "progress": False}


class TinyCNN(nn.Module):
    """Conv → BN → ReLU → depthwise conv → global pool: the layers whose speed depends on memory layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.body[1].running_mean.uniform_(-0.1, 0.1)
        self.body[1].running_var.uniform_(0.5, 1.5)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.body(x)


class OOMOver(TinyCNN):
    """Raises CUDA out-of-memory for batches larger than ``limit`` (as a GPU would)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.calls.append(-x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x)


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 24, 24, 3), dtype=np.uint8)


def test_channels_last_gives_the_default_layout_features() -> None:
    x = crops(20)
    a = extract_features(TinyCNN(), x, batch_size=8, channels_last=False, **NORM)
    b = extract_features(TinyCNN(), x, batch_size=8, channels_last=True, **NORM)
    assert a.shape == (20, 8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(a).max() > 0.05  # not a constant output


def test_cuda_oom_halves_the_batch_and_gives_the_same_features(caplog) -> None:
    x = crops(21)
    ref = extract_features(TinyCNN(), x, batch_size=16, **NORM)
    net = OOMOver(limit=5)
    with caplog.at_level(logging.WARNING, logger="hyperst"):
        got = extract_features(net, x, batch_size=16, **NORM)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # 16 fails, 8 fails, 4 fits; the smaller size is kept for the rest (no retry at 16 for the next chunk)
    assert net.calls[:3] == [-16, -8, 4]
    assert max(net.calls) == 4
    assert sum(c for c in net.calls if c > 0) == 21
    assert [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()] == [
        "CUDA out of memory with 16 crops per batch: continuing with 8",
        "CUDA out of memory with 8 crops per batch: continuing with 4",
    ]


def test_oom_with_one_crop_says_what_to_do() -> None:
    with pytest.raises(MemoryError, match=r"One batch of 1 crop does not fit in GPU memory; .*device='cpu'"):
        extract_features(OOMOver(limit=0), crops(3), batch_size=2, **NORM)


def test_batch_sizer_rejects_bad_sizes_and_covers_every_row() -> None:
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        BatchSizer(0)
    spans = list(BatchSizer(4).run(lambda a, b: (a, b), 10))
    assert spans == [(0, 4), (4, 8), (8, 10)]


def test_reader_thread_errors_reach_the_caller_and_the_thread_ends() -> None:
    def batches():
        yield crops(4)
        yield crops(4).astype(np.float32)  # a bad batch, found by the reader thread

    before = threading.active_count()
    with pytest.raises(ValueError, match=r"batches\[1\] has dtype float32; expected uint8"):
        extract_features(TinyCNN(), batches(), batch_size=4, **NORM)
    assert threading.active_count() == before
    # the same stream without a reader thread gives the same features
    x = crops(10)
    np.testing.assert_array_equal(extract_features(TinyCNN(), iter([x[:3], x[3:]]), batch_size=4, prefetch=0, **NORM),
                                  extract_features(TinyCNN(), iter([x[:3], x[3:]]), batch_size=4, prefetch=2, **NORM))


def test_compile_falls_back_to_eager_when_it_cannot_build(monkeypatch, caplog) -> None:
    def broken(module, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler (simulated)")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    x = crops(6)
    with caplog.at_level(logging.WARNING, logger="hyperst"):
        got = extract_features(TinyCNN(), x, batch_size=4, compile=True, **NORM)
    np.testing.assert_allclose(got, extract_features(TinyCNN(), x, batch_size=4, **NORM), rtol=1e-5, atol=1e-6)
    assert any("torch.compile is not available here (RuntimeError: no C++ compiler" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_compiled_backbone_pads_the_last_batch_and_matches_eager(caplog) -> None:
    pytest.importorskip("torch._inductor")
    x = crops(11)
    eager = extract_features(TinyCNN(), x, batch_size=4, **NORM)
    net = TinyCNN()
    with caplog.at_level(logging.WARNING, logger="hyperst"):
        got = extract_features(net, x, batch_size=4, compile=True, **NORM)
    if any("torch.compile is not available" in r.getMessage() for r in caplog.records):
        pytest.skip("torch.compile cannot build kernels on this machine (the eager fallback is tested above)")
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-5)
    assert got.shape == (11, 8)
    assert set(net.calls) == {4}  # one shape only: the last 3 crops were padded to 4


def test_model_prediction_backs_off_on_cuda_oom(monkeypatch, one_thread) -> None:
    """``HyperST.predict_members`` halves its batch on out-of-memory and predicts the same values."""
    import hyperst as hst

    rng = np.random.default_rng(0)
    model = hst.tl.HyperST(hst.nn.HyperSTConfig(n_genes=3, image_dim=4, emb_dim=8), genes=["a", "b", "c"])
    spot, niche = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    ref, ref_emb = model.predict_members(spot, niche, batch_size=16)
    net = model.members[0]
    real, seen = type(net).forward, []

    def forward(self, image_spot, *args, **kwargs):
        seen.append(len(image_spot))
        if len(image_spot) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, image_spot, *args, **kwargs)

    monkeypatch.setattr(type(net), "forward", forward)
    got, emb = model.predict_members(spot, niche, batch_size=16)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(emb["image_spot"], ref_emb["image_spot"], rtol=1e-6, atol=1e-6)
    assert seen[:3] == [10, 5, 2]  # a batch of the 10 rows, halved until it fits
    assert seen[2:] == [2] * 5  # the size that fitted is kept for the rest
