"""The HyperST network: four ResMLP streams, hyperbolic lifting, decoder and total loss (METHOD §2–§4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperst import geometry as geo
from hyperst.nn._config import HyperSTConfig
from hyperst.nn._losses import hierarchical_contrastive_loss, hierarchical_entailment_loss

__all__ = ["HyperSTNetwork", "HyperSTOutput", "ImageHyperST", "ResMLP"]


class ResMLP(nn.Module):
    """Residual MLP block of the reference code.

    ``LayerNorm(in) → Linear(in→h) → 2 × [x + MLP(LayerNorm(x))] → LayerNorm(h)`` with
    ``MLP = Linear(h→2h) → GELU → Dropout → Linear(2h→h) → Dropout``; Xavier-uniform weights, zero
    biases.

    Parameters
    ----------
    in_dim
        Input size.
    hidden
        Output (and residual) size ``h``.
    dropout
        Dropout probability inside the MLPs.
    n_blocks
        Number of residual blocks (2 in the reference).
    """

    def __init__(self, in_dim: int, hidden: int, *, dropout: float = 0.1, n_blocks: int = 2) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(hidden),
                    "mlp": nn.Sequential(
                        nn.Linear(hidden, 2 * hidden),
                        nn.GELU(),
                        nn.Dropout(dropout),
                        nn.Linear(2 * hidden, hidden),
                        nn.Dropout(dropout),
                    ),
                }
            )
            for _ in range(n_blocks)
        )
        self.norm_out = nn.LayerNorm(hidden)
        _init_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(..., in_dim)`` inputs."""
        x = self.proj(self.norm_in(x))
        for block in self.blocks:
            x = x + block["mlp"](block["norm"](x))
        return self.norm_out(x)


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Stream(nn.Module):
    """Per-stream input layer followed by a ResMLP: ``ResMLP(Linear(x))``."""

    def __init__(self, in_dim: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.input = nn.Linear(in_dim, emb_dim)
        self.mlp = ResMLP(emb_dim, emb_dim, dropout=dropout)
        _init_linear(self.input)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.input(x))


@dataclass
class HyperSTOutput:
    """What :meth:`HyperSTNetwork.forward` returns.

    Attributes
    ----------
    prediction
        Predicted expression ``(n, G)`` (on the scale of the targets, log2(1 + counts) by default).
    features
        Stream name → Euclidean embedding after the modality projection (before lifting), ``(n, d)``.
        The decoder reads ``image_spot`` and ``image_niche`` from here.
    embeddings
        Stream name → embedding in the model's geometry, ``(n, d)``: Lorentz space components for
        ``geometry="lorentz"``, the α-scaled Euclidean vectors otherwise. Gene streams are present
        only when gene inputs were given.
    """

    prediction: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    embeddings: dict[str, Tensor] = field(default_factory=dict)


class HyperSTNetwork(nn.Module):
    """The HyperST network on precomputed image features.

    Four streams (image/gene × spot/niche) with their own input layer and ResMLP, one bias-free
    ``d×d`` projection per modality shared by both levels, a learnable scale ``exp(α)`` per modality
    (clamped ≤ 1), the exponential map onto the hyperboloid of learnable curvature, and a decoder
    ``ResMLP(2d→d) → Linear(d→G)`` on ``concat(I_s, I_n)``. The gene streams feed only the alignment
    losses: prediction needs the image features alone.

    Parameters
    ----------
    config
        The network's configuration.
    """

    def __init__(self, config: HyperSTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.emb_dim
        self.streams = nn.ModuleDict()
        for name in config.streams:
            in_dim = config.image_dim if name.startswith("image") else config.n_genes
            self.streams[name] = _Stream(in_dim, d, config.dropout)
        self.proj_image = nn.Linear(d, d, bias=False)
        _init_linear(self.proj_image)
        self.proj_gene = None
        if config.uses_alignment:
            self.proj_gene = nn.Linear(d, d, bias=False)
            _init_linear(self.proj_gene)
        n_levels = 2 if config.has_niche else 1
        self.decoder = nn.Sequential(ResMLP(n_levels * d, d, dropout=config.dropout), nn.Linear(d, config.n_genes))
        _init_linear(self.decoder[1])

        # Learnable scalars. Each one is trainable only when a loss depends on it, so that every
        # trainable parameter receives a gradient (DistributedDataParallel requires it).
        aligned = config.uses_alignment
        alpha0 = math.log(d**-0.5)
        self.alpha_image = nn.Parameter(torch.tensor(alpha0), requires_grad=aligned)
        self.alpha_gene = nn.Parameter(torch.tensor(alpha0), requires_grad=aligned)
        lo, hi = config.curvature_range
        self._log_c_range = (math.log(lo), math.log(hi))
        self.log_curvature = nn.Parameter(
            torch.tensor(math.log(config.curvature)),
            requires_grad=config.learn_curvature and aligned and config.geometry == "lorentz",
        )
        self.log_logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.temperature)),
            requires_grad=config.learn_logit_scale and config.alignment,
        )

    # ------------------------------------------------------------------ learnable scalars
    @property
    def curvature(self) -> Tensor:
        """Curvature magnitude ``c = exp(kappa)`` clamped to ``config.curvature_range``."""
        return self.log_curvature.clamp(*self._log_c_range).exp()

    @property
    def logit_scale(self) -> Tensor:
        """Contrastive logit scale ``s = 1/tau``, clamped to ``config.max_logit_scale``."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The learnable scalars (α per modality, curvature, logit scale): excluded from weight decay."""
        return [self.alpha_image, self.alpha_gene, self.log_curvature, self.log_logit_scale]

    def parameter_groups(self, weight_decay: float = 0.01) -> list[dict]:
        """AdamW parameter groups: weight decay on the weights, none on the learnable scalars (as MERU)."""
        scalar_ids = {id(p) for p in self.scalar_parameters()}
        decayed = [p for p in self.parameters() if id(p) not in scalar_ids and p.requires_grad]
        scalars = [p for p in self.scalar_parameters() if p.requires_grad]
        groups = [{"params": decayed, "weight_decay": weight_decay}]
        if scalars:
            groups.append({"params": scalars, "weight_decay": 0.0})
        return groups

    # ------------------------------------------------------------------ forward
    def _lift(self, x: Tensor, modality: str) -> Tensor:
        alpha = self.alpha_image if modality == "image" else self.alpha_gene
        u = x * alpha.clamp(max=0.0).exp()
        if self.config.geometry == "lorentz":
            return geo.expmap0(u, self.curvature)
        return u

    def forward(
        self,
        image_spot: Tensor,
        image_niche: Tensor | None = None,
        gene_spot: Tensor | None = None,
        gene_niche: Tensor | None = None,
    ) -> HyperSTOutput:
        """Embed the inputs and predict expression.

        Parameters
        ----------
        image_spot
            Image features of the spot crops, ``(n, image_dim)``.
        image_niche
            Image features of the niche crops, ``(n, image_dim)``; required when the model has niche
            streams.
        gene_spot
            Spot expression ``(n, G)``: needed only for the alignment losses (training).
        gene_niche
            Niche expression ``(n, G)``: as ``gene_spot``, for models with niche streams.

        Gene inputs are ignored by models without alignment losses (they have no gene streams).

        Returns
        -------
        :class:`HyperSTOutput`.
        """
        cfg = self.config
        if not cfg.uses_alignment:  # no gene streams: gene inputs are not used
            gene_spot = gene_niche = None
        inputs = {"image_spot": image_spot, "image_niche": image_niche, "gene_spot": gene_spot,
                  "gene_niche": gene_niche}
        if cfg.has_niche and image_niche is None:
            raise ValueError("`image_niche` is required: this model has niche streams (levels='spot+niche').")
        if cfg.has_niche and (gene_spot is None) != (gene_niche is None):
            raise ValueError("Pass both `gene_spot` and `gene_niche` (or neither) to a spot+niche model.")
        n = image_spot.shape[0]
        for name, value in inputs.items():
            if value is None or name not in cfg.streams:
                continue
            expected = cfg.image_dim if name.startswith("image") else cfg.n_genes
            if value.ndim != 2 or value.shape[1] != expected or value.shape[0] != n:
                raise ValueError(
                    f"`{name}` must have shape ({n}, {expected}), got {tuple(value.shape)}."
                )

        features: dict[str, Tensor] = {}
        embeddings: dict[str, Tensor] = {}
        for name in cfg.streams:
            x = inputs[name]
            if x is None:
                continue
            modality = "image" if name.startswith("image") else "gene"
            proj = self.proj_image if modality == "image" else self.proj_gene
            assert proj is not None  # gene streams exist only together with their projection
            features[name] = proj(self.streams[name](x))
            embeddings[name] = self._lift(features[name], modality)

        levels = [features["image_spot"], features["image_niche"]] if cfg.has_niche else [features["image_spot"]]
        prediction = self.decoder(torch.cat(levels, dim=-1))
        return HyperSTOutput(prediction=prediction, features=features, embeddings=embeddings)

    # ------------------------------------------------------------------ loss
    def loss(self, output: HyperSTOutput, target: Tensor) -> dict[str, Tensor]:
        """Total loss ``MSE + beta * (HCA + w_e * HEA)`` and its components.

        Parameters
        ----------
        output
            The forward pass, run with gene inputs when alignment or entailment is on.
        target
            Expression targets ``(n, G)``.

        Returns
        -------
        ``{"loss", "mse", "hca", "hea", "hca/<pair>", "hea/<term>", "curvature", "logit_scale"}``;
        ``"loss"`` carries the gradient, every other value is detached. Absent losses are 0.
        """
        cfg = self.config
        if target.shape != output.prediction.shape:
            raise ValueError(f"`target` must have shape {tuple(output.prediction.shape)}, got {tuple(target.shape)}.")
        mse = F.mse_loss(output.prediction.float(), target.float())
        zero = mse.new_zeros(())
        out: dict[str, Tensor] = {"mse": mse.detach()}
        c = self.curvature
        pairs = cfg.active_contrastive_pairs() if cfg.alignment else {}
        terms = cfg.active_entailment_terms()
        needed = {s for (pair, _) in pairs.values() for s in pair} | {s for t in terms.values() for s in t[:2]}
        missing = sorted(needed - set(output.embeddings))
        if missing:
            raise ValueError(f"The alignment losses need the gene inputs; embeddings {missing} are missing.")
        hca = hea = zero
        if pairs:
            hca, parts = hierarchical_contrastive_loss(
                output.embeddings, pairs, scale=self.logit_scale, c=c, geometry=cfg.geometry
            )
            out.update({f"hca/{k}": v for k, v in parts.items()})
        if terms:
            hea, parts = hierarchical_entailment_loss(
                output.embeddings, terms, c=c, min_radius=cfg.min_radius, geometry=cfg.geometry
            )
            out.update({f"hea/{k}": v for k, v in parts.items()})
        align = hca + cfg.entailment_weight * hea
        out["loss"] = mse + cfg.beta * align
        out["hca"] = hca.detach()
        out["hea"] = hea.detach()
        out["curvature"] = c.detach()
        out["logit_scale"] = self.logit_scale.detach()
        return out


class ImageHyperST(nn.Module):
    """HyperST with an image backbone in front: crops in, expression out.

    One backbone is shared by the spot and niche crops (as in the reference). Any module mapping
    ``(n, 3, H, W)`` images to ``(n, config.image_dim)`` features works: a timm model with
    ``num_classes=0``, one with LoRA adapters, or a small test network.

    Parameters
    ----------
    backbone
        Image feature extractor.
    config
        Network configuration; ``config.image_dim`` must equal the backbone's output size.
    """

    def __init__(self, backbone: nn.Module, config: HyperSTConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.network = HyperSTNetwork(config)

    @property
    def config(self) -> HyperSTConfig:
        """The network configuration."""
        return self.network.config

    def encode(self, images: Tensor) -> Tensor:
        """Backbone features of a batch of crops, checked against ``config.image_dim``."""
        feats = self.backbone(images)
        if feats.ndim != 2 or feats.shape[1] != self.config.image_dim:
            raise ValueError(
                f"The backbone returned features of shape {tuple(feats.shape)}; the network expects "
                f"(n, {self.config.image_dim}). Set `image_dim` to the backbone's output size."
            )
        return feats

    def forward(
        self,
        spot_images: Tensor,
        niche_images: Tensor | None = None,
        gene_spot: Tensor | None = None,
        gene_niche: Tensor | None = None,
    ) -> HyperSTOutput:
        """Run the backbone on the crops (spot and niche in one pass) and the network on the features."""
        if niche_images is not None and self.config.has_niche:
            n = spot_images.shape[0]
            feats = self.encode(torch.cat([spot_images, niche_images], dim=0))
            image_spot, image_niche = feats[:n], feats[n:]
        else:
            image_spot, image_niche = self.encode(spot_images), None
        return self.network(image_spot, image_niche, gene_spot, gene_niche)

    def loss(self, output: HyperSTOutput, target: Tensor) -> dict[str, Tensor]:
        """See :meth:`HyperSTNetwork.loss`."""
        return self.network.loss(output, target)
