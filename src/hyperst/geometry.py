r"""Lorentz-model hyperbolic geometry on space components.

Points of the hyperboloid of curvature :math:`-c` (:math:`c > 0`) are stored by their *space*
components :math:`x \in \mathbb{R}^d`; the time component is implied,
:math:`x_t = \sqrt{1/c + \lVert x \rVert^2}` (:func:`time_component`). This is the parametrisation of
MERU (Desai et al., 2023) and of the HyperST reference code (METHOD §3).

Every function works on the last dimension and broadcasts over the leading ones. Inputs in float16 or
bfloat16 are computed in float32 and autocast is disabled inside, so the functions are safe in
mixed-precision training; float64 inputs stay float64. The curvature ``c`` is a positive float or a
0-d tensor (so it can be learned).

Numerical notes
---------------
- :func:`dist` uses the stable form
  :math:`d = \tfrac{2}{\sqrt c}\,\operatorname{asinh}\big(\tfrac{\sqrt c}{2}\lVert x-y\rVert_L\big)`
  with the Lorentzian norm of the difference computed without cancellation, so ``dist(x, x) == 0``
  exactly and small distances are accurate in float32. :func:`pairwise_dist` uses the matrix form
  :math:`\operatorname{arccosh}(-c\langle x,y\rangle_L)/\sqrt c` of the reference code (one matrix
  product); near zero it is accurate to about :math:`\sqrt{2\epsilon_{mach}}\,(1+\sqrt c\lVert x\rVert)`.
- ``arcsin``/``arccos`` arguments are clamped to :math:`[-1+\delta, 1-\delta]` with
  :math:`\delta = \max(\epsilon, \epsilon_{mach})`: with the reference's :math:`\epsilon = 10^{-8}`
  the clamp would be a no-op in float32 (``1 - 1e-8 == 1``) and the gradient at the bound infinite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = [
    "dist",
    "euclidean_exterior_angle",
    "euclidean_half_aperture",
    "expmap0",
    "exterior_angle",
    "half_aperture",
    "inner",
    "logmap0",
    "pairwise_dist",
    "pairwise_inner",
    "time_component",
    "to_poincare",
]

EPS = 1e-8
#: Largest argument of ``sinh`` in :func:`expmap0` (as in MERU): keeps space norms below ``2**15 / sqrt(c)``.
MAX_EXP_ARG = math.asinh(2.0**15)
#: Default minimum radius ``K`` of the entailment cones (METHOD §3).
MIN_RADIUS = 0.1

P = ParamSpec("P")
R = TypeVar("R")


def _fp32(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast off and half-precision tensor arguments upcast to float32."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        args = tuple(_upcast(a) for a in args)  # type: ignore[assignment]
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}  # type: ignore[assignment]
        device_types = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)}
        with _no_autocast(device_types):
            return fn(*args, **kwargs)

    return wrapper


def _upcast(value: object) -> object:
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


class _no_autocast:
    """Disable autocast on every device type involved (and on CPU, where it is always available)."""

    def __init__(self, device_types: set[str]) -> None:
        self._contexts = [torch.autocast(device_type=d, enabled=False) for d in sorted(device_types | {"cpu"})]

    def __enter__(self) -> None:
        for ctx in self._contexts:
            ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)


def _check_curvature(c: float | Tensor) -> None:
    # A tensor curvature is only shape-checked: reading its value would synchronise the device on
    # every call, and learned curvatures are kept positive by construction (exp of a clamped log).
    if isinstance(c, Tensor):
        if c.numel() != 1:
            raise ValueError(f"Curvature `c` must be a scalar, got a tensor of shape {tuple(c.shape)}.")
    elif not c > 0:
        raise ValueError(f"Curvature `c` must be positive, got {c}.")


def _bound(dtype: torch.dtype, eps: float) -> float:
    """Margin that keeps asin/acos arguments strictly inside (-1, 1) in ``dtype``."""
    return max(eps, torch.finfo(dtype).eps)


def _sqnorm(x: Tensor) -> Tensor:
    return (x * x).sum(dim=-1)


@_fp32
def time_component(x: Tensor, c: float | Tensor = 1.0) -> Tensor:
    r"""Time component :math:`x_t = \sqrt{1/c + \lVert x\rVert^2}` of points given by space components.

    Parameters
    ----------
    x
        Space components, shape ``(..., d)``.
    c
        Curvature magnitude (the space has curvature :math:`-c`).

    Returns
    -------
    Tensor of shape ``(...)``.
    """
    _check_curvature(c)
    return torch.sqrt(1.0 / c + _sqnorm(x))


@_fp32
def expmap0(u: Tensor, c: float | Tensor = 1.0, eps: float = EPS) -> Tensor:
    r"""Exponential map at the origin: lift a tangent (Euclidean) vector onto the hyperboloid.

    Returns the space components :math:`\sinh(r)\,u/r` with :math:`r = \sqrt c\,\lVert u\rVert`,
    :math:`r` clamped to :math:`[\epsilon, \operatorname{asinh}(2^{15})]` (METHOD §3).

    Parameters
    ----------
    u
        Tangent vectors at the origin, shape ``(..., d)``.
    c
        Curvature magnitude.
    eps
        Lower clamp of :math:`r` (the zero vector maps to the origin with a finite gradient).

    Returns
    -------
    Space components, shape ``(..., d)``.
    """
    _check_curvature(c)
    r = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    rnorm = r * torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    sinh_in = rnorm.clamp(min=eps, max=MAX_EXP_ARG)
    return torch.sinh(sinh_in) * u / rnorm.clamp(min=eps)


@_fp32
def logmap0(x: Tensor, c: float | Tensor = 1.0, eps: float = EPS) -> Tensor:
    r"""Logarithmic map at the origin, the inverse of :func:`expmap0`.

    Returns :math:`d(O, x)\,x/\lVert x\rVert` with :math:`d(O,x) = \operatorname{asinh}(\sqrt c\lVert x\rVert)/\sqrt c`
    (equal to the reference's ``arccosh(sqrt(c) x_t)`` form, but accurate for small norms).

    Parameters
    ----------
    x
        Space components, shape ``(..., d)``.
    c
        Curvature magnitude.
    eps
        Lower clamp of the norm in the denominator.

    Returns
    -------
    Tangent vectors at the origin, shape ``(..., d)``.
    """
    _check_curvature(c)
    r = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    rnorm = r * torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.asinh(rnorm) * x / rnorm.clamp(min=eps)


@_fp32
def inner(x: Tensor, y: Tensor, c: float | Tensor = 1.0) -> Tensor:
    r"""Row-wise Lorentzian inner product :math:`\langle x,y\rangle_L = x\cdot y - x_t y_t`.

    Parameters
    ----------
    x, y
        Space components, broadcastable shapes ``(..., d)``.
    c
        Curvature magnitude.

    Returns
    -------
    Tensor of shape ``(...)``; :math:`\langle x,x\rangle_L = -1/c`.
    """
    _check_curvature(c)
    xt = torch.sqrt(1.0 / c + _sqnorm(x))
    yt = torch.sqrt(1.0 / c + _sqnorm(y))
    return (x * y).sum(dim=-1) - xt * yt


@_fp32
def pairwise_inner(x: Tensor, y: Tensor, c: float | Tensor = 1.0) -> Tensor:
    r"""Lorentzian inner products between all rows of ``x`` (``n × d``) and ``y`` (``m × d``).

    Returns
    -------
    Tensor of shape ``(n, m)``.
    """
    _check_curvature(c)
    xt = torch.sqrt(1.0 / c + _sqnorm(x))
    yt = torch.sqrt(1.0 / c + _sqnorm(y))
    return x @ y.transpose(-1, -2) - xt.unsqueeze(-1) * yt.unsqueeze(-2)


@_fp32
def dist(x: Tensor, y: Tensor, c: float | Tensor = 1.0) -> Tensor:
    r"""Row-wise geodesic distance :math:`\operatorname{arccosh}(-c\langle x,y\rangle_L)/\sqrt c`.

    Computed in the cancellation-free form
    :math:`\tfrac{2}{\sqrt c}\operatorname{asinh}\big(\tfrac{\sqrt c}{2}\sqrt{\lVert x-y\rVert^2 - (x_t-y_t)^2}\big)`
    with :math:`x_t - y_t = (x-y)\cdot(x+y)/(x_t+y_t)`: ``dist(x, x)`` is exactly 0 (with a zero
    gradient) and small distances keep full float32 precision.

    Parameters
    ----------
    x, y
        Space components, broadcastable shapes ``(..., d)``.
    c
        Curvature magnitude.

    Returns
    -------
    Tensor of shape ``(...)``.
    """
    _check_curvature(c)
    diff = x - y
    xt = torch.sqrt(1.0 / c + _sqnorm(x))
    yt = torch.sqrt(1.0 / c + _sqnorm(y))
    dt = (diff * (x + y)).sum(dim=-1) / (xt + yt)
    lsq = (_sqnorm(diff) - dt * dt).clamp(min=0.0)
    positive = lsq > 0
    lnorm = torch.where(positive, torch.sqrt(torch.where(positive, lsq, torch.ones_like(lsq))), 0.0)
    rc = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    return 2.0 * torch.asinh(0.5 * rc * lnorm) / rc


@_fp32
def pairwise_dist(x: Tensor, y: Tensor, c: float | Tensor = 1.0, eps: float = EPS) -> Tensor:
    r"""Geodesic distances between all rows of ``x`` (``n × d``) and ``y`` (``m × d``).

    :math:`\operatorname{arccosh}(\max(-c\langle x,y\rangle_L, 1+\epsilon))/\sqrt c` with one matrix
    product, as in the reference code (used for contrastive logits). See :func:`dist` for the
    accurate row-wise version.

    Parameters
    ----------
    x, y
        Space components, shapes ``(n, d)`` and ``(m, d)``.
    c
        Curvature magnitude.
    eps
        Lower clamp of the ``arccosh`` argument above 1.

    Returns
    -------
    Tensor of shape ``(n, m)``.
    """
    z = -c * pairwise_inner(x, y, c)
    rc = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    return torch.acosh(z.clamp(min=1.0 + eps)) / rc


@_fp32
def half_aperture(x: Tensor, c: float | Tensor = 1.0, min_radius: float = MIN_RADIUS, eps: float = EPS) -> Tensor:
    r"""Half-aperture of the entailment cone at ``x``: :math:`\arcsin(2K / (\sqrt c\lVert x\rVert + \epsilon))`.

    The argument is clamped to :math:`[-1+\delta, 1-\delta]`; points closer to the origin than
    :math:`2K/\sqrt c` get the widest cone (:math:`\approx \pi/2`).

    Parameters
    ----------
    x
        Cone apices (space components), shape ``(..., d)``.
    c
        Curvature magnitude.
    min_radius
        :math:`K`, the cone's minimum radius (0.1 in MERU and the reference).
    eps
        Stabiliser of the denominator and of the clamp.

    Returns
    -------
    Angles in radians, shape ``(...)``.
    """
    _check_curvature(c)
    rc = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    arg = 2.0 * min_radius / (rc * torch.linalg.vector_norm(x, dim=-1) + eps)
    b = _bound(arg.dtype, eps)
    return torch.asin(arg.clamp(min=-1.0 + b, max=1.0 - b))


@_fp32
def exterior_angle(x: Tensor, y: Tensor, c: float | Tensor = 1.0, eps: float = EPS) -> Tensor:
    r"""Exterior angle at ``x`` of the geodesic triangle ``O``–``x``–``y``.

    It is :math:`\pi` minus the interior angle at ``x``: 0 when ``y`` lies on the geodesic ray from
    the origin through ``x`` beyond ``x``, :math:`\pi` when ``y`` lies between the origin and ``x``.
    With :math:`z = c\langle x,y\rangle_L`,
    :math:`\arccos\big((y_t + z x_t)/(\lVert x\rVert\sqrt{\max(z^2-1,\epsilon)} + \epsilon)\big)`.

    Parameters
    ----------
    x
        Cone apices (parents), shape ``(..., d)``.
    y
        Points tested for entailment (children), broadcastable with ``x``.
    c
        Curvature magnitude.
    eps
        Stabiliser of the square root, denominator and clamp.

    Returns
    -------
    Angles in radians in :math:`[0, \pi]`, shape ``(...)``.
    """
    _check_curvature(c)
    xt = torch.sqrt(1.0 / c + _sqnorm(x))
    yt = torch.sqrt(1.0 / c + _sqnorm(y))
    z = c * ((x * y).sum(dim=-1) - xt * yt)
    numer = yt + z * xt
    denom = torch.linalg.vector_norm(x, dim=-1) * torch.sqrt((z * z - 1.0).clamp(min=eps)) + eps
    arg = numer / denom
    b = _bound(arg.dtype, eps)
    return torch.acos(arg.clamp(min=-1.0 + b, max=1.0 - b))


@_fp32
def euclidean_half_aperture(x: Tensor, min_radius: float = MIN_RADIUS, eps: float = EPS) -> Tensor:
    r"""Half-aperture of a Euclidean entailment cone (Ganea et al., 2018): :math:`\arcsin(K/\lVert x\rVert)`.

    Used by the Euclidean counterpart of HyperST (``geometry="euclidean"``).
    """
    arg = min_radius / (torch.linalg.vector_norm(x, dim=-1) + eps)
    b = _bound(arg.dtype, eps)
    return torch.asin(arg.clamp(min=-1.0 + b, max=1.0 - b))


@_fp32
def euclidean_exterior_angle(x: Tensor, y: Tensor, eps: float = EPS) -> Tensor:
    r"""Euclidean exterior angle at ``x`` of the triangle ``O``–``x``–``y``: the angle between ``x`` and ``y - x``."""
    d = y - x
    cos = (x * d).sum(dim=-1) / (torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(d, dim=-1) + eps)
    b = _bound(cos.dtype, eps)
    return torch.acos(cos.clamp(min=-1.0 + b, max=1.0 - b))


@_fp32
def to_poincare(x: Tensor, c: float | Tensor = 1.0) -> Tensor:
    r"""Map space components to the Poincaré ball: :math:`p = x / (1 + \sqrt c\,x_t)`.

    The image is the ball of radius :math:`1/\sqrt c` (an isometry of the two models); multiply by
    :math:`\sqrt c` for the unit disk used in plots.

    Parameters
    ----------
    x
        Space components, shape ``(..., d)``.
    c
        Curvature magnitude.

    Returns
    -------
    Poincaré-ball coordinates, shape ``(..., d)``.
    """
    _check_curvature(c)
    rc = math.sqrt(c) if not isinstance(c, Tensor) else c.sqrt()
    xt = torch.sqrt(1.0 / c + _sqnorm(x)).unsqueeze(-1)
    return x / (1.0 + rc * xt)
