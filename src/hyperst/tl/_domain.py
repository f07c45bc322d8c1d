"""Domain-shift checks at predict time: is this slide, and each spot, like the slides the model trained on.

Per spot, an out-of-distribution score of the image features against the training spots
(:meth:`hyperst.tl._uncertainty.FeatureSpace.score`), flagged above a threshold calibrated on *held-out*
training-domain spots (each member's validation slides scored against a feature space fit without
them), so that about ``ood_rate`` of new spots from the training domain are flagged. Per slide: the
fraction of flagged spots, a pixel size coarser than the training slides' (the crops had to be
upsampled), and the stain (optical density of the crops, :func:`hyperst.pp.crop_optical_density`)
against the training slides'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hyperst.tl._uncertainty import FeatureSpace

__all__ = ["DomainReference", "domain_reference"]

#: a slide is flagged when more than this fraction of its spots is flagged (5× the calibrated spot rate)
SLIDE_FRACTION = 0.25
#: a slide is flagged when its pixels are this much coarser than the coarsest training slide's
PIXEL_RATIO = 1.5
#: a slide is flagged when its mean optical density is this many spreads from the training slides'
COLOUR_Z = 4.0


@dataclass
class DomainReference:
    """What the domain checks compare a new slide with.

    Attributes
    ----------
    space
        Feature space of the training spots (the OOD score).
    threshold
        Spot flag threshold: the ``1 - ood_rate`` quantile of the held-out training-domain scores.
    ood_rate
        Nominal fraction of training-domain spots flagged.
    held_out
        ``{slide: fraction of its spots flagged}`` for the held-out training slides (cross-fitted).
    slides
        ``{slide: {"pixel_size": µm, "od_mean": [r, g, b], "od_std": [r, g, b]}}`` of the training slides
        (what their feature tables recorded).
    """

    space: FeatureSpace
    threshold: float
    ood_rate: float
    held_out: dict[str, float] = field(default_factory=dict)
    slides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-compatible settings (the arrays of :attr:`space` go to the model's tensor file)."""
        return {"threshold": self.threshold, "ood_rate": self.ood_rate, "held_out": self.held_out,
                "slides": self.slides}

    def check(
        self,
        features: np.ndarray,
        samples: np.ndarray,
        slides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Scores, flags and the slide-level report of spots ``features`` from slides ``samples``.

        Parameters
        ----------
        features
            ``(n, D)`` image features (spot ‖ niche, as in training).
        samples
            Slide of each spot.
        slides
            What is known of each predicted slide (``pixel_size``, ``od_mean``), e.g. from its feature table.

        Returns
        -------
        ``(score, flag, report)``; ``report`` has ``threshold``, ``ood_rate``, ``ood_fraction`` (all spots),
        ``flagged`` (any slide flagged), ``slides`` (per slide: ``ood_fraction``, ``flags`` — the alarms
        ``"ood"`` and ``"colour"`` —, ``notes`` — ``"pixel_size"`` — and the numbers behind them),
        ``messages`` (one line per alarm) and ``notes`` (one line per note). A pixel size coarser than the
        training slides' is a note, not an alarm: downsampling a Her2ST section to 3.2 µm/px alone cost
        0.06 PCC@50 (``docs/benchmarks.md``); what it does to the features shows in the OOD score.
        """
        score = self.space.score(features).astype(np.float32)
        flag = score > self.threshold
        samples = np.asarray(samples).astype(str)
        per_slide: dict[str, Any] = {}
        messages: list[str] = []
        notes: list[str] = []
        train_px = [float(v["pixel_size"]) for v in self.slides.values() if v.get("pixel_size")]
        od_train = np.array([v["od_mean"] for v in self.slides.values() if v.get("od_mean") is not None], float)
        for name in dict.fromkeys(samples):
            mask = samples == name
            frac = float(flag[mask].mean()) if mask.any() else 0.0
            info: dict[str, Any] = {"n_spots": int(mask.sum()), "ood_fraction": frac,
                                    "median_score": float(np.median(score[mask])), "flags": []}
            if frac > SLIDE_FRACTION:
                info["flags"].append("ood")
                messages.append(f"{name}: {frac:.0%} of the spots look unlike the training spots (OOD score > "
                                f"{self.threshold:.2f}; about {self.ood_rate:.0%} expected)")
            meta = dict((slides or {}).get(name, {}))
            px = meta.get("pixel_size")
            info["notes"] = []
            if px and train_px:
                info["pixel_size"] = float(px)
                info["training_pixel_size"] = max(train_px)
                if float(px) > PIXEL_RATIO * max(train_px):  # a note, not an alarm: it costs little on its own
                    info["notes"].append("pixel_size")
                    notes.append(f"{name}: scanned at {float(px):.2f} µm/px, coarser than the training slides "
                                 f"(≤ {max(train_px):.2f} µm/px): its crops were upsampled")
            od = meta.get("od_mean")
            if od is not None and len(od_train):
                z = _colour_z(np.asarray(od, float), od_train, self.slides)
                info["colour_z"] = z
                if z > COLOUR_Z:
                    info["flags"].append("colour")
                    messages.append(f"{name}: stain colour (optical density) is {z:.1f} spreads from the training "
                                    "slides'")
            per_slide[name] = info
        report = {"threshold": self.threshold, "ood_rate": self.ood_rate, "ood_fraction": float(flag.mean()) if
                  len(flag) else 0.0, "flagged": any(v["flags"] for v in per_slide.values()), "slides": per_slide,
                  "messages": messages, "notes": notes}
        return score, flag, report


def _colour_z(od: np.ndarray, od_train: np.ndarray, slides: Mapping[str, Mapping[str, Any]]) -> float:
    """Largest per-channel distance of a slide's mean optical density from the training slides' mean.

    In units of the between-slide standard deviation, floored at a quarter of the mean within-slide
    (between-spot) standard deviation so that a handful of near-identical training slides does not make
    every new slide an outlier.
    """
    within = np.array([v["od_std"] for v in slides.values() if v.get("od_std") is not None], float)
    floor = 0.25 * within.mean(0) if len(within) else np.full(3, 0.02)
    between = od_train.std(0, ddof=1) if len(od_train) > 1 else np.zeros(3)
    spread = np.maximum(between, np.maximum(floor, 1e-3))
    return float(np.max(np.abs(od - od_train.mean(0)) / spread))


def domain_reference(
    features: np.ndarray,
    samples: np.ndarray,
    held_out: Sequence[np.ndarray],
    *,
    slides: Mapping[str, Mapping[str, Any]] | None = None,
    ood_rate: float = 0.05,
    n_components: int = 32,
    seed: int = 0,
) -> DomainReference:
    """Fit the reference on the training spots and calibrate its threshold on held-out ones.

    Parameters
    ----------
    features
        ``(n, D)`` image features of every training spot (spot ‖ niche).
    samples
        Slide of each spot.
    held_out
        One boolean mask per ensemble member: its validation spots. Each is scored against a feature space
        fit on the other spots; the threshold is the ``1 - ood_rate`` quantile of those scores.
    slides
        Per training slide: ``pixel_size`` and ``od_mean``/``od_std`` when known.
    ood_rate
        Fraction of held-out training-domain spots above the threshold.
    n_components
        Principal axes of the feature space.
    seed
        Seed of the PCA.
    """
    if not 0 < ood_rate < 1:
        raise ValueError(f"`ood_rate` must be in (0, 1), got {ood_rate!r}.")
    samples = np.asarray(samples).astype(str)
    scores, names = [], []
    for mask in held_out:
        mask = np.asarray(mask, bool)
        if not mask.any() or mask.all():
            continue
        space = FeatureSpace.fit(features[~mask], n_components=n_components, seed=seed)
        scores.append(space.score(features[mask]))
        names.append(samples[mask])
    if not scores:
        raise ValueError("No held-out spots to calibrate the out-of-distribution threshold.")
    pooled = np.concatenate(scores)
    threshold = float(np.quantile(pooled, 1 - ood_rate))
    labels = np.concatenate(names)
    held = {str(s): float((pooled[labels == s] > threshold).mean()) for s in dict.fromkeys(labels)}
    space = FeatureSpace.fit(features, n_components=n_components, seed=seed)
    return DomainReference(space, threshold, float(ood_rate), held, {k: dict(v) for k, v in (slides or {}).items()})
