"""Configuration of the HyperST network: one dataclass that fully describes a model and round-trips JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["CONTRASTIVE_PAIRS", "ENTAILMENT_TERMS", "PRESETS", "HyperSTConfig"]

Geometry = Literal["lorentz", "euclidean"]
Levels = Literal["spot+niche", "spot"]

#: The four directed contrastive pairs of HCA (METHOD §4), ``name -> (query stream, key stream)``.
CONTRASTIVE_PAIRS: dict[str, tuple[str, str]] = {
    "image_spot->gene_spot": ("image_spot", "gene_spot"),
    "gene_spot->image_spot": ("gene_spot", "image_spot"),
    "image_niche->gene_spot": ("image_niche", "gene_spot"),
    "gene_niche->image_spot": ("gene_niche", "image_spot"),
}

#: The four entailment terms of HEA, ``name -> (parent, child, hierarchy)`` in the default hierarchy
#: image ⊐ gene and spot ⊐ niche (METHOD §4). ``hierarchy`` says which reversal flag swaps the pair.
ENTAILMENT_TERMS: dict[str, tuple[str, str, str]] = {
    "image_gene_spot": ("image_spot", "gene_spot", "image_gene"),
    "image_gene_niche": ("image_niche", "gene_niche", "image_gene"),
    "spot_niche_image": ("image_spot", "image_niche", "spot_niche"),
    "spot_niche_gene": ("gene_spot", "gene_niche", "spot_niche"),
}

def _default_contrastive_weights() -> dict[str, float]:
    return dict.fromkeys(CONTRASTIVE_PAIRS, 1.0)


def _default_entailment_weights() -> dict[str, float]:
    return dict.fromkeys(ENTAILMENT_TERMS, 0.5)


@dataclass
class HyperSTConfig:
    """Everything that defines a HyperST network; serialises to JSON.

    The defaults are the reference code's (METHOD §2–§5). Variants used in the paper's ablations are
    available by name through :meth:`from_preset` (see :data:`PRESETS`).

    Parameters
    ----------
    n_genes
        Number of predicted genes ``G`` (also the input size of the gene streams).
    image_dim
        Size of the image features entering the image streams (the backbone's output size).
    emb_dim
        Embedding size ``d`` of all four streams (reference: 1024).
    dropout
        Dropout inside the ResMLP blocks.
    geometry
        ``"lorentz"`` (hyperbolic; distance logits, hyperbolic cones) or ``"euclidean"`` (the
        Euclidean counterpart: cosine logits as in CLIP, Euclidean cones of Ganea et al., 2018).
    levels
        ``"spot+niche"`` (HyperST) or ``"spot"`` (single level, as MERU/CLIP; no niche streams, the
        decoder sees the spot image embedding only).
    alignment
        Use the contrastive alignment (HCA).
    entailment
        Use the entailment alignment (HEA).
    contrastive_weights
        Weight of each directed pair of :data:`CONTRASTIVE_PAIRS`; HCA is the weighted mean of the
        active pairs (reference: equal weights, i.e. ¼ each).
    entailment_weights
        Weight of each term of :data:`ENTAILMENT_TERMS`; HEA is the weighted *sum* of the active
        terms (reference: ½ each; the paper: ¼ each). A weight of 0 switches a term off.
    aperture_image_gene
        Aperture multiplier ``k`` of the image–gene cones (reference 0.7, paper 1).
    aperture_spot_niche
        Aperture multiplier ``k`` of the spot–niche cones (reference 1.2, paper 1).
    reverse_image_gene
        Reverse the image ⊐ gene hierarchy (gene becomes the parent).
    reverse_spot_niche
        Reverse the spot ⊐ niche hierarchy (niche becomes the parent).
    min_radius
        ``K`` of the cones' half-aperture.
    beta
        Weight of the alignment losses: ``L = MSE + beta * (HCA + entailment_weight * HEA)``.
    entailment_weight
        ``w_e`` above.
    curvature
        Initial curvature magnitude ``c`` (learned as ``c = exp(kappa)``).
    curvature_range
        Clamp of ``c``.
    learn_curvature
        Learn ``c``; otherwise it stays at its initial value.
    temperature
        Initial contrastive temperature ``tau``; the logit scale ``s = 1/tau`` is learned.
    max_logit_scale
        Upper clamp of ``s``.
    learn_logit_scale
        Learn ``s``.
    """

    n_genes: int
    image_dim: int
    emb_dim: int = 1024
    dropout: float = 0.1
    geometry: Geometry = "lorentz"
    levels: Levels = "spot+niche"
    alignment: bool = True
    entailment: bool = True
    contrastive_weights: dict[str, float] = field(default_factory=_default_contrastive_weights)
    entailment_weights: dict[str, float] = field(default_factory=_default_entailment_weights)
    aperture_image_gene: float = 0.7
    aperture_spot_niche: float = 1.2
    reverse_image_gene: bool = False
    reverse_spot_niche: bool = False
    min_radius: float = 0.1
    beta: float = 0.2
    entailment_weight: float = 0.4
    curvature: float = 1.0
    curvature_range: tuple[float, float] = (0.1, 10.0)
    learn_curvature: bool = True
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_logit_scale: bool = True

    def __post_init__(self) -> None:
        self.curvature_range = tuple(float(v) for v in self.curvature_range)  # type: ignore[assignment]
        self.contrastive_weights = {**_default_contrastive_weights(), **self._known(
            self.contrastive_weights, CONTRASTIVE_PAIRS, "contrastive_weights")}
        self.entailment_weights = {**_default_entailment_weights(), **self._known(
            self.entailment_weights, ENTAILMENT_TERMS, "entailment_weights")}
        self.validate()

    @staticmethod
    def _known(weights: dict[str, float], known: dict[str, Any], name: str) -> dict[str, float]:
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ValueError(f"`{name}` has unknown keys {unknown}; valid keys are {sorted(known)}.")
        out = {k: float(v) for k, v in weights.items()}
        bad = {k: v for k, v in out.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"`{name}` must hold finite non-negative weights, got {bad}.")
        return out

    def validate(self) -> None:
        """Check every field; raise :class:`ValueError` naming the offending one."""
        for name in ("n_genes", "image_dim", "emb_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.geometry not in ("lorentz", "euclidean"):
            raise ValueError(f"`geometry` must be 'lorentz' or 'euclidean', got {self.geometry!r}.")
        if self.levels not in ("spot+niche", "spot"):
            raise ValueError(f"`levels` must be 'spot+niche' or 'spot', got {self.levels!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        positive = ("aperture_image_gene", "aperture_spot_niche", "min_radius", "curvature", "temperature",
                    "max_logit_scale")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
        for name in ("beta", "entailment_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r}.")
        lo, hi = self.curvature_range
        if not (0 < lo <= self.curvature <= hi):
            raise ValueError(
                f"`curvature`={self.curvature} must lie inside `curvature_range`={self.curvature_range} "
                "with a positive lower bound."
            )
        if 1.0 / self.temperature > self.max_logit_scale:
            raise ValueError(
                f"1/`temperature`={1 / self.temperature:.3g} exceeds `max_logit_scale`={self.max_logit_scale}."
            )
        if self.alignment and not self.active_contrastive_pairs():
            raise ValueError("`alignment=True` but every active pair of `contrastive_weights` has weight 0.")

    # ------------------------------------------------------------------ derived structure
    @property
    def has_niche(self) -> bool:
        """Whether the niche streams exist (``levels == "spot+niche"``)."""
        return self.levels == "spot+niche"

    @property
    def uses_alignment(self) -> bool:
        """Whether any alignment loss (HCA or HEA) is on, i.e. whether the gene streams are needed."""
        return self.alignment or bool(self.entailment and any(w > 0 for w in self.entailment_weights.values()))

    @property
    def streams(self) -> tuple[str, ...]:
        """Names of the streams the network builds (gene streams only when an alignment loss uses them)."""
        image = ("image_spot", "image_niche") if self.has_niche else ("image_spot",)
        if not self.uses_alignment:
            return image
        return (*image, "gene_spot", "gene_niche") if self.has_niche else (*image, "gene_spot")

    def active_contrastive_pairs(self) -> dict[str, tuple[tuple[str, str], float]]:
        """Directed contrastive pairs in use, ``name -> ((query, key), weight)``; empty without alignment."""
        streams = set(self.streams)
        return {
            name: (pair, self.contrastive_weights[name])
            for name, pair in CONTRASTIVE_PAIRS.items()
            if set(pair) <= streams and self.contrastive_weights[name] > 0
        }

    def active_entailment_terms(self) -> dict[str, tuple[str, str, float, float]]:
        """Entailment terms in use, ``name -> (parent, child, weight, k)`` after applying reversals."""
        if not self.entailment:
            return {}
        streams = set(self.streams)
        out: dict[str, tuple[str, str, float, float]] = {}
        for name, (parent, child, hierarchy) in ENTAILMENT_TERMS.items():
            weight = self.entailment_weights[name]
            if weight <= 0 or not {parent, child} <= streams:
                continue
            reverse = self.reverse_image_gene if hierarchy == "image_gene" else self.reverse_spot_niche
            k = self.aperture_image_gene if hierarchy == "image_gene" else self.aperture_spot_niche
            if reverse:
                parent, child = child, parent
            out[name] = (parent, child, weight, k)
        return out

    # ------------------------------------------------------------------ presets and serialisation
    @classmethod
    def from_preset(cls, name: str, /, *, n_genes: int, image_dim: int, **overrides: Any) -> HyperSTConfig:
        """Build a named variant (see :data:`PRESETS`), with any field overridden.

        Parameters
        ----------
        name
            One of :data:`PRESETS`.
        n_genes, image_dim
            Required sizes.
        **overrides
            Any other field of :class:`HyperSTConfig`.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        names = {f.name for f in dataclasses.fields(cls)} - {"n_genes", "image_dim"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {v[0]!r}?" for k, v in hints.items() if v)
            raise ValueError(f"Unknown `config` keys {unknown}{' (' + hint + ')' if hint else ''}; "
                             f"valid keys: {sorted(names)}.")
        kwargs = {**PRESETS[name], **overrides}
        return cls(n_genes=n_genes, image_dim=image_dim, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-compatible) representation."""
        out = dataclasses.asdict(self)
        out["curvature_range"] = list(self.curvature_range)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperSTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a :class:`ValueError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown HyperSTConfig fields {unknown}.")
        data = dict(data)
        if "curvature_range" in data:
            data["curvature_range"] = tuple(data["curvature_range"])
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to a JSON string, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> HyperSTConfig:
        """Read a config from a JSON string or from a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))


_ZERO_IMAGE_GENE = {"image_gene_spot": 0.0, "image_gene_niche": 0.0}

#: Named variants for the paper's ablations (METHOD §7): ``name -> field overrides``.
PRESETS: dict[str, dict[str, Any]] = {
    # full model, reference-code loss weighting (½ sum, k = 0.7 image→gene, 1.2 spot→niche)
    "hyperst": {},
    # full model, the paper's weighting (¼ of the four terms, k = 1)
    "hyperst_paper": {
        "entailment_weights": dict.fromkeys(ENTAILMENT_TERMS, 0.25),
        "aperture_image_gene": 1.0,
        "aperture_spot_niche": 1.0,
    },
    "no_image_gene_hea": {"entailment_weights": {**_default_entailment_weights(), **_ZERO_IMAGE_GENE}},
    "no_hea": {"entailment": False},
    "mse_only": {"alignment": False, "entailment": False},
    "reversed_spot_niche": {"reverse_spot_niche": True},
    "reversed_image_gene": {"reverse_image_gene": True},
    "euclidean": {"geometry": "euclidean"},
    # single level, hyperbolic, contrastive + image ⊐ gene entailment (MERU-like)
    "meru": {"levels": "spot"},
    # single level, Euclidean cosine contrastive, no entailment
    "clip": {"levels": "spot", "geometry": "euclidean", "entailment": False},
}
