"""The Lorentz-model maths of hyperst.geometry, pinned against geoopt and closed forms."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from hyperst import geometry as geo


def _points(n: int, d: int, *, scale: float = 1.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def _full(x: torch.Tensor, c: float) -> torch.Tensor:
    """Space components → full hyperboloid coordinates (time first), geoopt's layout."""
    return torch.cat([geo.time_component(x, c).unsqueeze(-1), x], dim=-1)


@pytest.mark.parametrize("c", [0.1, 1.0, 3.7])
def test_dist_matches_geoopt(c: float) -> None:
    x, y = _points(64, 8, seed=1), _points(64, 8, scale=2.0, seed=2)
    manifold = geoopt.manifolds.Lorentz(k=1.0 / c)
    expected = manifold.dist(_full(x, c), _full(y, c))
    torch.testing.assert_close(geo.dist(x, y, c), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(geo.pairwise_dist(x, y, c).diagonal(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_expmap0_matches_geoopt_and_inner_constraint(c: float) -> None:
    u = _points(32, 5, scale=1.5, seed=3)
    manifold = geoopt.manifolds.Lorentz(k=1.0 / c)
    tangent = torch.cat([torch.zeros(32, 1, dtype=u.dtype), u], dim=-1)
    expected = manifold.expmap0(tangent)
    x = geo.expmap0(u, c)
    torch.testing.assert_close(_full(x, c), expected, rtol=1e-6, atol=1e-6)
    # every point satisfies <x, x>_L = -1/c
    torch.testing.assert_close(geo.inner(x, x, c), torch.full((32,), -1.0 / c, dtype=u.dtype))
    # distance to the origin is c^{-1/2} * sqrt(c) * |u| = |u|
    origin = torch.zeros_like(x)
    torch.testing.assert_close(geo.dist(origin, x, c), u.norm(dim=-1), rtol=1e-9, atol=1e-9)


def test_pairwise_inner_matches_rowwise() -> None:
    x, y = _points(7, 4, seed=4), _points(5, 4, seed=5)
    full = geo.pairwise_inner(x, y, 1.3)
    expected = geo.inner(x.unsqueeze(1), y.unsqueeze(0), 1.3)
    torch.testing.assert_close(full, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metric_axioms(dtype: torch.dtype) -> None:
    c = 1.7
    x, y, z = (_points(500, 16, scale=1.5, seed=s, dtype=dtype) for s in (6, 7, 8))
    assert torch.equal(geo.dist(x, x, c), torch.zeros(500, dtype=dtype))
    torch.testing.assert_close(geo.dist(x, y, c), geo.dist(y, x, c), rtol=0, atol=0)
    dxy, dyz, dxz = geo.dist(x, y, c), geo.dist(y, z, c), geo.dist(x, z, c)
    slack = 1e-5 if dtype == torch.float32 else 1e-10
    assert bool((dxz <= dxy + dyz + slack * (1 + dxz)).all())
    assert bool((dxy > 0).all())


def test_pairwise_dist_agrees_with_dist_and_is_small_on_diagonal() -> None:
    x = _points(50, 16, scale=0.5, seed=9, dtype=torch.float32)
    y = _points(40, 16, scale=0.5, seed=10, dtype=torch.float32)
    pw = geo.pairwise_dist(x, y, 1.0)
    rowwise = geo.dist(x.unsqueeze(1), y.unsqueeze(0), 1.0)
    torch.testing.assert_close(pw, rowwise, rtol=1e-4, atol=1e-4)
    # the matrix form is only sqrt(eps)-accurate at zero distance (documented)
    assert float(geo.pairwise_dist(x, x, 1.0).diagonal().max()) < 5e-3


def test_small_distances_are_accurate_in_float32() -> None:
    x = _points(20, 32, scale=2.0, seed=11)
    y = x + 1e-4 * _points(20, 32, seed=12)
    ref = geo.dist(x, y, 1.0)  # float64
    got = geo.dist(x.float(), y.float(), 1.0).double()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("c", [0.3, 1.0, 5.0])
def test_expmap_logmap_round_trip(c: float) -> None:
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        u = _points(100, 12, scale=0.7, seed=13, dtype=dtype)
        torch.testing.assert_close(geo.logmap0(geo.expmap0(u, c), c), u, rtol=tol, atol=tol)
        x = _points(100, 12, scale=3.0, seed=14, dtype=dtype)
        torch.testing.assert_close(geo.expmap0(geo.logmap0(x, c), c), x, rtol=tol, atol=tol)


def test_expmap0_clamps_huge_norms() -> None:
    u = torch.full((3, 4), 1e4)
    x = geo.expmap0(u, 1.0)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.norm(dim=-1), torch.full((3,), 2.0**15), rtol=1e-5, atol=0)


def test_half_aperture_known_angles() -> None:
    # arcsin(2K / (sqrt(c) |x|)): |x| = 0.4, K = 0.1, c = 1 -> arcsin(0.5) = pi/6
    x = torch.tensor([[0.4, 0.0], [0.0, -0.4], [0.4 / math.sqrt(2), 0.4 / math.sqrt(2)]], dtype=torch.float64)
    torch.testing.assert_close(geo.half_aperture(x, 1.0, min_radius=0.1), torch.full((3,), math.pi / 6, dtype=x.dtype))
    # c = 4 halves the norm needed for the same angle; arcsin(sqrt(2)/2) = pi/4
    x = torch.tensor([[0.1 * math.sqrt(2), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(geo.half_aperture(x, 4.0, min_radius=0.1), torch.tensor([math.pi / 4], dtype=x.dtype))
    # inside the minimum radius the cone is (almost) a half-space
    near = geo.half_aperture(torch.tensor([[1e-3, 0.0]]), 1.0)
    assert math.pi / 2 - float(near) < 1e-3


def _geodesic_point(a: float, t: float, c: float = 1.0) -> torch.Tensor:
    """Point at distance t from x = (sinh a, 0) along the geodesic orthogonal to the ray O→x (c = 1 units)."""
    s = 1.0 / math.sqrt(c)
    return torch.tensor([[s * math.sinh(a) * math.cosh(t), s * math.sinh(t)]], dtype=torch.float64)


@pytest.mark.parametrize("c", [1.0, 2.5])
def test_exterior_angle_known_angles(c: float) -> None:
    s = 1.0 / math.sqrt(c)
    x = torch.tensor([[s * math.sinh(1.0), 0.0]], dtype=torch.float64)
    beyond = torch.tensor([[s * math.sinh(2.0), 0.0]], dtype=torch.float64)  # on the ray, past x
    between = torch.tensor([[s * math.sinh(0.5), 0.0]], dtype=torch.float64)  # between O and x
    assert float(geo.exterior_angle(x, beyond, c)) < 5e-4  # 0 up to the clamp margin
    assert abs(float(geo.exterior_angle(x, between, c)) - math.pi) < 5e-4
    # the geodesic through x orthogonal to O→x: interior angle pi/2, exterior angle pi/2
    perpendicular = _geodesic_point(1.0, 0.8, c)
    torch.testing.assert_close(geo.exterior_angle(x, perpendicular, c), torch.tensor([math.pi / 2], dtype=x.dtype))


def test_exterior_angle_matches_hyperbolic_law_of_cosines() -> None:
    c = 1.0
    x, y = _points(200, 6, seed=15), _points(200, 6, scale=1.5, seed=16)
    o = torch.zeros_like(x)
    a, b, opp = geo.dist(o, x, c), geo.dist(x, y, c), geo.dist(o, y, c)
    cos_interior = (torch.cosh(a) * torch.cosh(b) - torch.cosh(opp)) / (torch.sinh(a) * torch.sinh(b))
    expected = math.pi - torch.acos(cos_interior.clamp(-1, 1))
    torch.testing.assert_close(geo.exterior_angle(x, y, c), expected, rtol=1e-6, atol=1e-6)


def test_euclidean_cone_functions() -> None:
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        geo.euclidean_exterior_angle(x, y), torch.tensor([0.0, math.pi / 2, math.pi], dtype=x.dtype), atol=2e-4, rtol=0
    )
    expected = torch.tensor([math.pi / 6], dtype=x.dtype)
    torch.testing.assert_close(geo.euclidean_half_aperture(x[:1], min_radius=1.0), expected)


@pytest.mark.parametrize("c", [1.0, 0.25])
def test_to_poincare_is_an_isometry(c: float) -> None:
    x, y = _points(50, 3, seed=17), _points(50, 3, scale=2.0, seed=18)
    p, q = geo.to_poincare(x, c), geo.to_poincare(y, c)
    assert bool((p.norm(dim=-1) < 1 / math.sqrt(c)).all())
    num = 2 * c * (p - q).pow(2).sum(-1)
    den = (1 - c * p.pow(2).sum(-1)) * (1 - c * q.pow(2).sum(-1))
    d_poincare = torch.acosh(1 + num / den) / math.sqrt(c)
    torch.testing.assert_close(d_poincare, geo.dist(x, y, c), rtol=1e-8, atol=1e-8)


def test_time_component() -> None:
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(geo.time_component(x, 1.0), torch.tensor([math.sqrt(26.0)]))
    torch.testing.assert_close(geo.time_component(x, 0.5), torch.tensor([math.sqrt(27.0)]))


def test_invalid_curvature() -> None:
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="positive"):
        geo.dist(x, x, 0.0)
    with pytest.raises(ValueError, match="scalar"):
        geo.expmap0(x, torch.ones(2))


_FUNCS = {
    "expmap0": lambda x, y, c: geo.expmap0(x, c),
    "logmap0": lambda x, y, c: geo.logmap0(x, c),
    "dist": lambda x, y, c: geo.dist(x, y, c),
    "pairwise_dist": lambda x, y, c: geo.pairwise_dist(x, y, c),
    "half_aperture": lambda x, y, c: geo.half_aperture(x, c),
    "exterior_angle": lambda x, y, c: geo.exterior_angle(x, y, c),
    "to_poincare": lambda x, y, c: geo.to_poincare(x, c),
    "euclidean_half_aperture": lambda x, y, c: geo.euclidean_half_aperture(x),
    "euclidean_exterior_angle": lambda x, y, c: geo.euclidean_exterior_angle(x, y),
}


@pytest.mark.parametrize("name", sorted(_FUNCS))
@pytest.mark.parametrize("case", ["zeros", "huge", "same", "random"])
def test_finite_values_and_gradients(name: str, case: str) -> None:
    g = torch.Generator().manual_seed(0)
    if case == "zeros":
        x, y = torch.zeros(4, 8), torch.zeros(4, 8)
    elif case == "huge":
        x, y = torch.randn(4, 8, generator=g) * 1e4, torch.randn(4, 8, generator=g) * 1e4
    elif case == "same":
        x = torch.randn(4, 8, generator=g)
        y = x.clone()
    else:
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    x.requires_grad_(True)
    y.requires_grad_(True)
    c = torch.tensor(1.3, requires_grad=True)
    out = _FUNCS[name](x, y, c)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in (x, y, c):
        if t.grad is not None:
            assert torch.isfinite(t.grad).all(), f"non-finite gradient in {name} ({case})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    x = _points(16, 8, seed=19, dtype=torch.float32)
    y = _points(16, 8, scale=2.0, seed=20, dtype=torch.float32)
    xh, yh = x.to(dtype), y.to(dtype)
    out = geo.dist(xh, yh, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, geo.dist(xh.float(), yh.float(), 1.0))
    with torch.autocast("cpu", dtype=dtype):
        lifted = geo.expmap0(x @ torch.eye(8), 1.0)  # the matmul runs in low precision under autocast
        assert lifted.dtype == torch.float32
        angle = geo.exterior_angle(lifted, geo.expmap0(y, 1.0), 1.0)
        assert angle.dtype == torch.float32
    assert torch.isfinite(angle).all()
