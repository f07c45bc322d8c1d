"""The HyperST network, its configuration and every ablation variant."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hyperst import geometry as geo
from hyperst.nn import PRESETS, HyperSTConfig, HyperSTNetwork, ImageHyperST, ResMLP

N_GENES, IMAGE_DIM, EMB = 12, 20, 16


def _inputs(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_spot": torch.randn(n, IMAGE_DIM, generator=g),
        "image_niche": torch.randn(n, IMAGE_DIM, generator=g),
        "gene_spot": torch.rand(n, N_GENES, generator=g) * 3,
        "gene_niche": torch.rand(n, N_GENES, generator=g) * 3,
    }


def _config(preset: str = "hyperst", **kw) -> HyperSTConfig:
    return HyperSTConfig.from_preset(preset, n_genes=N_GENES, image_dim=IMAGE_DIM, emb_dim=EMB, **kw)


def test_resmlp_structure() -> None:
    block = ResMLP(10, 6, dropout=0.0)
    # LN(10) + Linear(10→6) + 2 × [LN(6) + Linear(6→12) + Linear(12→6)] + LN(6)
    expected = 2 * 10 + (10 * 6 + 6) + 2 * (2 * 6 + (6 * 12 + 12) + (12 * 6 + 6)) + 2 * 6
    assert sum(p.numel() for p in block.parameters()) == expected
    assert all(float(m.bias.abs().sum()) == 0 for m in block.modules() if isinstance(m, nn.Linear))
    out = block(torch.randn(5, 10))
    assert out.shape == (5, 6)
    # the final LayerNorm: zero mean, unit variance per row
    torch.testing.assert_close(out.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_variant_builds_runs_and_round_trips(preset: str) -> None:
    torch.manual_seed(0)
    cfg = _config(preset)
    assert HyperSTConfig.from_json(cfg.to_json()) == cfg
    net = HyperSTNetwork(cfg)
    x = _inputs()
    out = net(**x)
    assert out.prediction.shape == (8, N_GENES)
    assert set(out.embeddings) == set(cfg.streams)
    losses = net.loss(out, x["gene_spot"])
    assert torch.isfinite(losses["loss"])
    expected_total = losses["mse"] + cfg.beta * (losses["hca"] + cfg.entailment_weight * losses["hea"])
    torch.testing.assert_close(losses["loss"].detach(), expected_total)
    losses["loss"].backward()
    # every trainable parameter gets a finite gradient (DistributedDataParallel relies on it)
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{preset}: {name} has no gradient"
            assert torch.isfinite(p.grad).all(), f"{preset}: {name} has a non-finite gradient"


def test_variant_structure() -> None:
    full = _config("hyperst")
    assert full.streams == ("image_spot", "image_niche", "gene_spot", "gene_niche")
    assert len(full.active_contrastive_pairs()) == 4
    assert {k: v[2:] for k, v in full.active_entailment_terms().items()} == {
        "image_gene_spot": (0.5, 0.7),
        "image_gene_niche": (0.5, 0.7),
        "spot_niche_image": (0.5, 1.2),
        "spot_niche_gene": (0.5, 1.2),
    }
    paper = _config("hyperst_paper")
    assert {v[2:] for v in paper.active_entailment_terms().values()} == {(0.25, 1.0)}
    assert set(_config("no_image_gene_hea").active_entailment_terms()) == {"spot_niche_image", "spot_niche_gene"}
    assert _config("no_hea").active_entailment_terms() == {}
    mse = _config("mse_only")
    assert mse.streams == ("image_spot", "image_niche")
    assert mse.active_contrastive_pairs() == {}
    rev = _config("reversed_spot_niche").active_entailment_terms()
    assert rev["spot_niche_image"][:2] == ("image_niche", "image_spot")
    assert rev["image_gene_spot"][:2] == ("image_spot", "gene_spot")
    rev = _config("reversed_image_gene").active_entailment_terms()
    assert rev["image_gene_niche"][:2] == ("gene_niche", "image_niche")
    meru = _config("meru")
    assert meru.streams == ("image_spot", "gene_spot")
    assert set(meru.active_contrastive_pairs()) == {"image_spot->gene_spot", "gene_spot->image_spot"}
    assert set(meru.active_entailment_terms()) == {"image_gene_spot"}
    clip = _config("clip")
    assert (clip.geometry, clip.levels, clip.active_entailment_terms()) == ("euclidean", "spot", {})


def test_lorentz_embeddings_are_lifted_and_euclidean_are_not() -> None:
    torch.manual_seed(0)
    x = _inputs()
    net = HyperSTNetwork(_config()).eval()
    out = net(**x)
    for name, emb in out.embeddings.items():
        modality = "image" if name.startswith("image") else "gene"
        alpha = getattr(net, f"alpha_{modality}").exp()
        torch.testing.assert_close(emb, geo.expmap0(alpha * out.features[name], net.curvature))
    eu = HyperSTNetwork(_config("euclidean")).eval()
    out = eu(**x)
    torch.testing.assert_close(out.embeddings["image_spot"], eu.alpha_image.exp() * out.features["image_spot"])


def test_prediction_needs_only_the_image() -> None:
    torch.manual_seed(0)
    net = HyperSTNetwork(_config()).eval()
    x = _inputs()
    with torch.no_grad():
        full = net(**x)
        image_only = net(x["image_spot"], x["image_niche"])
    torch.testing.assert_close(full.prediction, image_only.prediction)
    assert set(image_only.embeddings) == {"image_spot", "image_niche"}
    with pytest.raises(ValueError, match="gene inputs"):
        net.loss(image_only, x["gene_spot"])
    # the decoder reads concat(I_s, I_n)
    expected = net.decoder(torch.cat([full.features["image_spot"], full.features["image_niche"]], -1))
    torch.testing.assert_close(full.prediction, expected)


def test_learnable_scalars_init_and_clamps() -> None:
    net = HyperSTNetwork(_config())
    assert math.isclose(float(net.alpha_image), math.log(EMB**-0.5), rel_tol=1e-6)
    assert math.isclose(float(net.curvature), 1.0, rel_tol=1e-6)
    assert math.isclose(float(net.logit_scale), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        net.log_curvature.fill_(5.0)
        net.log_logit_scale.fill_(10.0)
        net.alpha_image.fill_(2.0)
    assert math.isclose(float(net.curvature), 10.0, rel_tol=1e-6)
    assert math.isclose(float(net.logit_scale), 100.0, rel_tol=1e-6)
    out = net(**_inputs())
    # alpha is clamped at 0: the image features are lifted unscaled
    torch.testing.assert_close(out.embeddings["image_spot"], geo.expmap0(out.features["image_spot"], net.curvature))
    with torch.no_grad():
        net.log_curvature.fill_(-5.0)
    assert math.isclose(float(net.curvature), 0.1, rel_tol=1e-6)


def test_parameter_groups_exclude_scalars_from_weight_decay() -> None:
    net = HyperSTNetwork(_config())
    groups = net.parameter_groups(weight_decay=0.05)
    assert groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.scalar_parameters()}
    n_total = sum(1 for p in net.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_total
    # without alignment no scalar is trainable
    assert len(HyperSTNetwork(_config("mse_only")).parameter_groups()) == 1


def test_same_seed_same_model() -> None:
    torch.manual_seed(123)
    a = HyperSTNetwork(_config())
    torch.manual_seed(123)
    b = HyperSTNetwork(_config())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


def test_input_validation() -> None:
    net = HyperSTNetwork(_config())
    x = _inputs()
    with pytest.raises(ValueError, match="image_niche"):
        net(x["image_spot"])
    with pytest.raises(ValueError, match=r"`image_spot` must have shape \(8, 20\)"):
        net(x["image_spot"][:, :5], x["image_niche"])
    with pytest.raises(ValueError, match="both `gene_spot` and `gene_niche`"):
        net(x["image_spot"], x["image_niche"], x["gene_spot"])
    with pytest.raises(ValueError, match="target"):
        net.loss(net(**x), x["gene_spot"][:, :3])


def test_config_validation_and_json(tmp_path) -> None:
    cfg = _config("hyperst_paper", reverse_spot_niche=True, curvature=2.0)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert HyperSTConfig.from_json(path) == cfg
    assert json.loads(path.read_text())["entailment_weights"]["image_gene_spot"] == 0.25
    with pytest.raises(ValueError, match="Unknown preset"):
        HyperSTConfig.from_preset("nope", n_genes=3, image_dim=3)
    with pytest.raises(ValueError, match="`geometry`"):
        HyperSTConfig(n_genes=3, image_dim=3, geometry="poincare")
    with pytest.raises(ValueError, match="`n_genes`"):
        HyperSTConfig(n_genes=0, image_dim=3)
    with pytest.raises(ValueError, match="unknown keys"):
        HyperSTConfig(n_genes=3, image_dim=3, entailment_weights={"image_to_gene": 1.0})
    with pytest.raises(ValueError, match="`curvature`"):
        HyperSTConfig(n_genes=3, image_dim=3, curvature=50.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        HyperSTConfig(n_genes=3, image_dim=3, temperature=0.001)
    with pytest.raises(ValueError, match="Unknown HyperSTConfig fields"):
        HyperSTConfig.from_dict({"n_genes": 3, "image_dim": 3, "bogus": 1})


class _TinyBackbone(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_image_model_with_backbone_in_front() -> None:
    torch.manual_seed(0)
    model = ImageHyperST(_TinyBackbone(IMAGE_DIM), _config())
    spot, niche = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    x = _inputs(4)
    out = model(spot, niche, x["gene_spot"], x["gene_niche"])
    losses = model.loss(out, x["gene_spot"])
    losses["loss"].backward()
    assert model.backbone.conv.weight.grad is not None
    # identical to running the network on the backbone's features
    with torch.no_grad():
        model.eval()
        direct = model.network(model.backbone(spot), model.backbone(niche)).prediction
        torch.testing.assert_close(model(spot, niche).prediction, direct)
    bad = ImageHyperST(_TinyBackbone(7), _config())
    with pytest.raises(ValueError, match="image_dim"):
        bad(spot, niche)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_network_under_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = HyperSTNetwork(_config())
    x = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = net(**x)
        losses = net.loss(out, x["gene_spot"])
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", ["hyperst", "euclidean", "mse_only"])
def test_training_beats_the_mean_predictor(preset: str) -> None:
    """Expression driven by the image features: a few hundred steps beat predicting the mean."""
    torch.manual_seed(0)
    n = 256
    image = torch.randn(n, IMAGE_DIM)
    niche = image + 0.3 * torch.randn(n, IMAGE_DIM)
    w = torch.randn(IMAGE_DIM, N_GENES) / math.sqrt(IMAGE_DIM)
    expr = torch.nn.functional.softplus(image @ w * 2) + 0.05 * torch.rand(n, N_GENES)
    train, test = slice(0, 192), slice(192, None)
    net = HyperSTNetwork(_config(preset, dropout=0.0))
    opt = torch.optim.AdamW(net.parameter_groups(0.01), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, 192, (64,))
        out = net(image[idx], niche[idx], expr[idx], expr[idx])
        loss = net.loss(out, expr[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(image[test], niche[test]).prediction
    mse_model = float(((pred - expr[test]) ** 2).mean())
    mse_mean = float(((expr[train].mean(0) - expr[test]) ** 2).mean())
    assert mse_model < 0.5 * mse_mean


def test_unknown_config_keys_name_the_valid_ones() -> None:
    from hyperst.nn import HyperSTConfig

    with pytest.raises(ValueError, match=r"Unknown `config` keys \['emb_dimm'\].*did you mean 'emb_dim'"):
        HyperSTConfig.from_preset("hyperst", n_genes=3, image_dim=4, emb_dimm=8)
