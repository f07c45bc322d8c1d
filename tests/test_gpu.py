"""GPU paths (skipped without CUDA; ``benchmarks/gpu.py`` runs them on a lent GPU).

They import only what the bare GPU image has (torch, timm, lightning, peft, numpy): no AnnData/SpatialData.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_features_on_cuda_match_cpu() -> None:
    from hyperst.pp import extract_features, load_backbone

    torch.manual_seed(0)
    net = load_backbone("resnet10t", random_init=True, device="cpu")
    x = _crops(16, int(net.hyperst_spec.input_size))
    cpu = extract_features(net, x, device="cpu", progress=False)
    gpu = extract_features(net, x, device="cuda", amp=False, progress=False)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
    bf16 = extract_features(net, x, device="cuda", progress=False)  # autocast by default on CUDA
    assert np.corrcoef(bf16.ravel(), cpu.ravel())[0, 1] > 0.99


def test_lora_training_step_on_cuda_lowers_the_loss() -> None:
    from hyperst.data import CropDataModule
    from hyperst.nn import HyperSTConfig, ImageHyperST
    from hyperst.pp import load_backbone
    from hyperst.tl import LoraSpec, TrainerOptions, TrainOptions
    from hyperst.tl._lora import add_lora
    from hyperst.tl._train import run_training

    torch.manual_seed(0)
    trunk = load_backbone("test_vit", random_init=True, device="cpu")
    add_lora(trunk, LoraSpec())
    size = int(trunk.hyperst_spec.input_size)
    n = 64
    targets = np.log2(1 + np.random.default_rng(1).poisson(2.0, size=(n, 12))).astype(np.float32)
    val = np.arange(n) < 8
    dm = CropDataModule(_crops(n, size, 1), _crops(n, size, 2), {"targets": targets, "niche_targets": targets},
                        ~val, val, batch_size=16, seed=0)
    model = ImageHyperST(trunk, HyperSTConfig(n_genes=12, image_dim=int(trunk.feature_dim)))
    out = run_training(model, dm, TrainOptions(max_epochs=3, lr=1e-3, progress=False), TrainerOptions(device="cuda"))
    losses = [h["train/loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    assert next(model.parameters()).device.type == "cuda"


def test_oom_backoff_on_a_real_gpu_batch() -> None:
    """A batch far too large for the GPU backs off instead of crashing (real CUDA out-of-memory)."""
    from hyperst.pp import extract_features

    class Greedy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            free = torch.cuda.mem_get_info()[0]
            if x.shape[0] > 4:  # ask for more than the free memory: a genuine OutOfMemoryError
                torch.empty(int(free * 2), dtype=torch.uint8, device=x.device)
            return x.mean(dim=(2, 3))

    feats = extract_features(Greedy(), _crops(10, 8), device="cuda", batch_size=16, mean=(0.5,) * 3,
                             std=(0.5,) * 3, progress=False)
    assert feats.shape == (10, 3)
