"""Contrastive and entailment losses: exact values, invariants and a toy optimisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyperst import geometry as geo
from hyperst.nn import (
    HyperSTConfig,
    contrastive_logits,
    contrastive_loss,
    entailment_loss,
    hierarchical_contrastive_loss,
    hierarchical_entailment_loss,
)


def test_contrastive_loss_by_hand() -> None:
    a = torch.tensor([[0.3, 0.0], [0.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.4, 0.1], [-0.2, 0.6]], dtype=torch.float64)
    s, c = 10.0, 1.0
    d = torch.tensor([[float(geo.dist(a[i], b[j], c)) for j in range(2)] for i in range(2)], dtype=torch.float64)
    logits = -s * d
    expected = -0.5 * (
        logits[0, 0] - torch.logsumexp(logits[0], 0) + logits[1, 1] - torch.logsumexp(logits[1], 0)
    )
    got = contrastive_loss(a, b, scale=s, c=c)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # direction matters: CE(b -> a) uses the transposed logits
    expected_t = F.cross_entropy(logits.T, torch.arange(2))
    torch.testing.assert_close(contrastive_loss(b, a, scale=s, c=c), expected_t, rtol=1e-5, atol=1e-6)


def test_euclidean_logits_are_scaled_cosines() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    logits = contrastive_logits(a, b, scale=5.0, geometry="euclidean")
    expected = 5.0 * torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    torch.testing.assert_close(logits, expected)


def test_contrastive_rejects_mismatched_batches_and_unknown_geometry() -> None:
    with pytest.raises(ValueError, match="same batch size"):
        contrastive_loss(torch.zeros(3, 2), torch.zeros(4, 2), scale=1.0)
    with pytest.raises(ValueError, match="geometry"):
        contrastive_logits(torch.zeros(3, 2), torch.zeros(3, 2), scale=1.0, geometry="poincare")


def _ray(norms: list[float], direction: list[float]) -> torch.Tensor:
    u = torch.tensor(direction, dtype=torch.float32)
    u = u / u.norm()
    return torch.stack([n * u for n in norms])


def test_entailment_zero_inside_cone_positive_outside() -> None:
    parent = _ray([1.0, 2.0], [1.0, 1.0])
    inside = parent * 1.7  # further along the same geodesic ray: exterior angle 0
    assert float(entailment_loss(parent, inside, aperture_scale=0.7)) == 0.0
    # a child slightly off the ray but inside the cone is still free
    aper = geo.half_aperture(parent)
    tilt = torch.tensor([[0.0, 0.05], [0.0, 0.05]])
    off = parent * 1.7 + tilt
    assert bool((geo.exterior_angle(parent, off) < aper).all())
    assert float(entailment_loss(parent, off, aperture_scale=1.0)) == 0.0
    # outside: orthogonal direction → loss = mean(ext - k·aper) exactly
    outside = torch.tensor([[-1.0, 1.0], [-2.0, 2.0]])
    ext = geo.exterior_angle(parent, outside)
    expected = (ext - 0.7 * aper).clamp(min=0).mean()
    got = entailment_loss(parent, outside, aperture_scale=0.7)
    assert float(got) > 0.5
    torch.testing.assert_close(got, expected)


def test_entailment_aperture_scale_widens_the_cone() -> None:
    parent = _ray([0.5], [1.0, 0.0])
    child = torch.tensor([[0.8, 0.35]])
    ext, aper = float(geo.exterior_angle(parent, child)), float(geo.half_aperture(parent))
    k_free = 1.05 * ext / aper
    assert float(entailment_loss(parent, child, aperture_scale=0.5 * k_free)) > 0
    assert float(entailment_loss(parent, child, aperture_scale=k_free)) == 0.0


def test_euclidean_entailment() -> None:
    parent = torch.tensor([[2.0, 0.0]])
    assert float(entailment_loss(parent, torch.tensor([[3.0, 0.0]]), geometry="euclidean")) == 0.0
    loss = entailment_loss(parent, torch.tensor([[2.0, 1.0]]), geometry="euclidean", min_radius=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.pi / 2 - math.asin(0.05)), atol=1e-4, rtol=0)


def test_hierarchical_losses_weighting_and_reversal() -> None:
    g = torch.Generator().manual_seed(0)
    emb = {k: torch.randn(8, 4, generator=g) for k in ("image_spot", "image_niche", "gene_spot", "gene_niche")}
    cfg = HyperSTConfig(n_genes=3, image_dim=2, emb_dim=4)
    pairs = cfg.active_contrastive_pairs()
    hca, parts = hierarchical_contrastive_loss(emb, pairs, scale=14.0, c=1.0)
    torch.testing.assert_close(hca, torch.stack(list(parts.values())).mean())  # reference: ¼ of the four
    terms = cfg.active_entailment_terms()
    hea, values = hierarchical_entailment_loss(emb, terms, c=1.0)
    torch.testing.assert_close(hea, 0.5 * torch.stack(list(values.values())).sum())  # reference: ½ sum
    expected_term = entailment_loss(emb["image_spot"], emb["gene_spot"], aperture_scale=0.7)
    torch.testing.assert_close(values["image_gene_spot"], expected_term)
    expected_sn = entailment_loss(emb["image_spot"], emb["image_niche"], aperture_scale=1.2)
    torch.testing.assert_close(values["spot_niche_image"], expected_sn)
    # reversing image ⊐ gene swaps parent and child of the image-gene terms only
    rev = HyperSTConfig(n_genes=3, image_dim=2, emb_dim=4, reverse_image_gene=True)
    _, rvalues = hierarchical_entailment_loss(emb, rev.active_entailment_terms(), c=1.0)
    expected_rev = entailment_loss(emb["gene_spot"], emb["image_spot"], aperture_scale=0.7)
    torch.testing.assert_close(rvalues["image_gene_spot"], expected_rev)
    torch.testing.assert_close(rvalues["spot_niche_image"], values["spot_niche_image"])
    # custom weights: a weighted mean for HCA
    cfg2 = HyperSTConfig(n_genes=3, image_dim=2, emb_dim=4, contrastive_weights={"image_spot->gene_spot": 3.0})
    hca2, parts2 = hierarchical_contrastive_loss(emb, cfg2.active_contrastive_pairs(), scale=14.0, c=1.0)
    p = list(parts2.values())
    torch.testing.assert_close(hca2, (3 * p[0] + p[1] + p[2] + p[3]) / 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["zeros", "huge", "random"])
def test_losses_finite_with_gradients(dtype: torch.dtype, case: str) -> None:
    g = torch.Generator().manual_seed(1)
    if case == "zeros":
        a, b = torch.zeros(6, 8), torch.zeros(6, 8)
    elif case == "huge":
        a, b = 1e4 * torch.randn(6, 8, generator=g), 1e4 * torch.randn(6, 8, generator=g)
    else:
        a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    a.requires_grad_(True)
    b.requires_grad_(True)
    log_c = torch.zeros((), requires_grad=True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    w = torch.eye(8)
    with torch.autocast("cpu", dtype=dtype):
        x = geo.expmap0(a @ w, log_c.exp())  # low-precision matmul feeding the fp32 geometry
        y = geo.expmap0(b @ w, log_c.exp())
        total = contrastive_loss(x, y, scale=scale, c=log_c.exp()) + entailment_loss(x, y, c=log_c.exp())
        total = total + contrastive_loss(x, y, scale=scale, geometry="euclidean")
        total = total + entailment_loss(x, y, geometry="euclidean")
    assert total.dtype == torch.float32
    assert torch.isfinite(total)
    total.backward()
    for t in (a, b, log_c, scale):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_toy_contrastive_optimisation(geometry: str) -> None:
    """Two views of the same latent: training pulls matched pairs together."""
    torch.manual_seed(0)
    n, d_in, d = 64, 10, 8
    latent = torch.randn(n, d_in)
    view_a = latent + 0.05 * torch.randn(n, d_in)
    view_b = latent @ torch.randn(d_in, d_in) + 0.05 * torch.randn(n, d_in)
    enc_a, enc_b = torch.nn.Linear(d_in, d), torch.nn.Linear(d_in, d)
    log_c = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([*enc_a.parameters(), *enc_b.parameters(), log_c], lr=1e-2)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = log_c.clamp(math.log(0.1), math.log(10)).exp()
        x = geo.expmap0(0.3 * enc_a(view_a), c) if geometry == "lorentz" else enc_a(view_a)
        y = geo.expmap0(0.3 * enc_b(view_b), c) if geometry == "lorentz" else enc_b(view_b)
        loss = 0.5 * (contrastive_loss(x, y, scale=10.0, c=c, geometry=geometry)
                      + contrastive_loss(y, x, scale=10.0, c=c, geometry=geometry))
        return loss, x, y

    first, _, _ = step()
    for _ in range(150):
        opt.zero_grad()
        loss, _, _ = step()
        loss.backward()
        opt.step()
    last, x, y = step()
    assert float(last.detach()) < 0.5 * float(first.detach())
    with torch.no_grad():
        c = float(log_c.exp())
        if geometry == "lorentz":
            dmat = geo.pairwise_dist(x, y, c)
        else:
            dmat = 1 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
        matched = dmat.diagonal()
        unmatched = dmat[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
        assert float(matched.mean()) < 0.5 * float(unmatched.mean())
        # every spot finds its own partner as the nearest for most rows
        assert float((dmat.argmin(dim=1) == torch.arange(n)).float().mean()) > 0.9
