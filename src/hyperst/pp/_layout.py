"""Crop geometry and spot-layout defaults: the physical (µm) side of spot and niche windows.

:data:`LAYOUTS` is the one table of layout defaults (spot diameter and centre-to-centre pitch in µm per
spot layout); readers, spot resolution, pseudo-spot grids and crop geometry all read it.
:class:`CropGeometry` turns a layout into the spot and niche window sides of METHOD §1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from hyperst._logging import logger

__all__ = [
    "GENERIC_NICHE_RATIO",
    "LAYOUTS",
    "MIN_SPOT_WINDOW_UM",
    "CropGeometry",
    "Layout",
    "is_positive",
    "layout_defaults",
]

Layout = Literal["visium", "st", "generic"]

#: Physical defaults per layout: spot diameter and centre-to-centre pitch in µm (Visium: 55 µm spots
#: 100 µm apart on a hexagonal grid; legacy ST: 100 µm spots 200 µm apart on a square grid).
LAYOUTS: dict[str, dict[str, float]] = {
    "visium": {"spot_diameter": 55.0, "pitch": 100.0},
    "st": {"spot_diameter": 100.0, "pitch": 200.0},
}

#: Side of the spot window in µm below which the window is enlarged (METHOD §1: max(112 µm, diameter)).
MIN_SPOT_WINDOW_UM: float = 112.0
#: Niche/spot window ratio of Visium (255 µm / 112 µm), used by the generic layout without a pitch.
GENERIC_NICHE_RATIO: float = 2.28


def layout_defaults(layout: str) -> tuple[float, float]:
    """Default ``(spot_diameter, pitch)`` in µm of a spot layout (from :data:`LAYOUTS`).

    Parameters
    ----------
    layout
        ``"visium"`` or ``"st"``.

    Returns
    -------
    ``(spot_diameter, pitch)`` in µm.

    Raises
    ------
    ValueError
        If the layout has no defaults.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Layout {layout!r} has no default spot geometry; known: {sorted(LAYOUTS)}.")
    d = LAYOUTS[layout]
    return float(d["spot_diameter"]), float(d["pitch"])


def is_positive(value: Any) -> bool:
    """Whether ``value`` is a real, finite, positive number (bools excluded).

    Parameters
    ----------
    value
        Anything.

    Returns
    -------
    ``True`` for a finite number ``> 0``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return bool(math.isfinite(value) and value > 0)


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropGeometry:
    """Physical size of the spot and niche windows and the pixel size of the crops.

    Parameters
    ----------
    spot_size_um
        Side of the square spot window in µm.
    niche_size_um
        Side of the square niche window in µm.
    out_size
        Side of the output crops in pixels (both crops are resized to ``out_size × out_size``).

    Raises
    ------
    ValueError
        If a size is not a positive finite number.
    """

    spot_size_um: float
    niche_size_um: float
    out_size: int = 224

    def __post_init__(self) -> None:
        for name in ("spot_size_um", "niche_size_um"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive finite number of µm, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int | np.integer):
            raise ValueError(f"`out_size` must be a positive int, got {self.out_size!r}.")
        if self.out_size < 1:
            raise ValueError(f"`out_size` must be a positive int, got {self.out_size!r}.")
        object.__setattr__(self, "out_size", int(self.out_size))

    @classmethod
    def for_layout(
        cls,
        layout: Layout,
        *,
        spot_diameter: float,
        pitch: float | None = None,
        out_size: int = 224,
    ) -> CropGeometry:
        """Crop geometry of METHOD §1 for a spot layout.

        The spot window side is ``max(112 µm, spot_diameter)``. The niche window is the square centred on
        the spot that covers the spot and its immediate neighbours:

        - ``"visium"`` (hexagonal, 6 neighbours): ``2 · (pitch + spot_diameter / 2)`` (≈ 255 µm),
        - ``"st"`` (square grid, 3 × 3 neighbours): ``2 · pitch + spot_diameter`` (500 µm for legacy ST),
        - ``"generic"``: ``2 · pitch + spot_diameter`` when the pitch is known, otherwise
          ``2.28 ×`` the spot window (the Visium ratio 255 / 112).

        Parameters
        ----------
        layout
            ``"visium"``, ``"st"`` or ``"generic"``.
        spot_diameter
            Spot diameter in µm.
        pitch
            Centre-to-centre distance of neighbouring spots in µm. For ``"visium"`` and ``"st"`` the
            standard pitch (100 µm / 200 µm) is used when it is ``None``.
        out_size
            Side of the output crops in pixels.

        Returns
        -------
        The crop geometry.

        Raises
        ------
        ValueError
            If the layout is unknown or a size is not positive.
        """
        if layout not in ("visium", "st", "generic"):
            raise ValueError(f"`layout` must be 'visium', 'st' or 'generic', got {layout!r}.")
        if not is_positive(spot_diameter):
            raise ValueError(f"`spot_diameter` must be a positive number of µm, got {spot_diameter!r}.")
        if pitch is not None and not is_positive(pitch):
            raise ValueError(f"`pitch` must be a positive number of µm or None, got {pitch!r}.")
        spot_side = max(MIN_SPOT_WINDOW_UM, float(spot_diameter))
        if pitch is None and layout in LAYOUTS:
            pitch = LAYOUTS[layout]["pitch"]
            logger.info(f"CropGeometry.for_layout: no pitch given, using the standard {layout} pitch {pitch} µm")
        if layout == "visium":
            assert pitch is not None
            niche_side = 2.0 * (pitch + spot_diameter / 2.0)
        elif pitch is not None:
            niche_side = 2.0 * pitch + spot_diameter
        else:
            niche_side = GENERIC_NICHE_RATIO * spot_side
        return cls(spot_size_um=spot_side, niche_size_um=max(niche_side, spot_side), out_size=out_size)

    def sides_px(self, pixel_size: float) -> tuple[float, float]:
        """Window sides in level-0 pixels.

        Parameters
        ----------
        pixel_size
            µm per level-0 pixel.

        Returns
        -------
        ``(spot_side_px, niche_side_px)``.

        Raises
        ------
        ValueError
            If ``pixel_size`` is not positive.
        """
        if not isinstance(pixel_size, int | float) or not math.isfinite(pixel_size) or pixel_size <= 0:
            raise ValueError(f"`pixel_size` must be a positive number of µm per pixel, got {pixel_size!r}.")
        return self.spot_size_um / pixel_size, self.niche_size_um / pixel_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-``dict`` form (JSON- and ``.uns``-serialisable).

        Returns
        -------
        ``{"spot_size_um": ..., "niche_size_um": ..., "out_size": ...}``.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CropGeometry:
        """Inverse of :meth:`to_dict`.

        Parameters
        ----------
        d
            Mapping with the fields of :class:`CropGeometry`.

        Returns
        -------
        The crop geometry.

        Raises
        ------
        ValueError
            If ``d`` has unknown or missing keys.
        """
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"CropGeometry.from_dict: unknown keys {sorted(unknown)}; expected {sorted(names)}.")
        missing = {"spot_size_um", "niche_size_um"} - set(d)
        if missing:
            raise ValueError(f"CropGeometry.from_dict: missing keys {sorted(missing)}.")
        kwargs = dict(d)
        if "out_size" in kwargs:
            kwargs["out_size"] = int(kwargs["out_size"])
        return cls(**kwargs)
