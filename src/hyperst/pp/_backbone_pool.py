"""How a backbone's activations become one feature vector per crop: pooling wrappers and test-time augmentation.

:func:`hyperst.pp.load_backbone` wraps the timm model according to :attr:`BackboneSpec.pool` and
:attr:`BackboneSpec.tta`; every wrapper keeps the contract of a pooled timm model (``forward`` returns
``(batch, feature_dim)``), so :func:`hyperst.pp.extract_features`, ``torch.compile`` and the LoRA path do not
care which one they get.

- :class:`ClsMeanPool`: class token ‖ mean patch token of a ViT (Virchow's embedding);
- :class:`StagePool`: the global mean of the last intermediate stages of the network, concatenated with its
  own pooled output (last), so mid-level texture features (which transfer better from ImageNet to histology
  than the last block alone) join the final embedding;
- :class:`DihedralTTA`: the mean feature over the eight rotations and reflections of the crop (H&E has no
  preferred orientation), at eight times the cost.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["POOLS", "STAGES", "TTAS", "ClsMeanPool", "DihedralTTA", "StagePool"]

#: Values of :attr:`BackboneSpec.pool`.
POOLS: tuple[str, ...] = ("default", "cls_mean", "stages")
#: Values of :attr:`BackboneSpec.tta` besides ``None``.
TTAS: tuple[str, ...] = ("dihedral",)
#: Intermediate stages :class:`StagePool` pools (the last ``STAGES`` of timm's ``feature_info``).
STAGES = 3


class ClsMeanPool(nn.Module):
    """Class token concatenated with the mean patch token of a timm ViT (Virchow's embedding)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        if getattr(trunk, "cls_token", None) is None or not hasattr(trunk, "forward_features"):
            raise ValueError("pool='cls_mean' needs a timm ViT with a class token.")
        self.trunk = trunk
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        self.feature_dim = 2 * int(trunk.num_features)
        self.num_features = self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(batch, 2 * embed_dim)`` features."""
        tokens = self.trunk.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


class StagePool(nn.Module):
    """Global means of the last ``stages`` intermediate feature maps ‖ the model's own pooled output.

    Uses timm's ``forward_intermediates`` (CNNs and ViTs alike); the model's usual pooled features are the
    last ``trunk.num_features`` columns, so ``pool="default"`` features are a slice of these. For
    EfficientNet-Lite0: 40 + 112 + 320 stage channels + 1280 = 1752 features.
    """

    def __init__(self, trunk: nn.Module, stages: int = STAGES) -> None:
        super().__init__()
        info = getattr(trunk, "feature_info", None)
        if not hasattr(trunk, "forward_intermediates") or not info:
            raise ValueError(f"pool='stages' needs a timm model with `forward_intermediates`; "
                             f"{type(trunk).__name__} has none (use pool='default').")
        if len(info) < stages:
            raise ValueError(f"pool='stages' pools the last {stages} stages; this model has {len(info)}.")
        self.trunk = trunk
        self.stages = int(stages)
        self.stage_dims = [int(f["num_chs"]) for f in info[-stages:]]
        self.feature_dim = sum(self.stage_dims) + int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)
        self.num_features = self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(batch, sum(stage channels) + num_features)`` features."""
        final, inter = self.trunk.forward_intermediates(x, indices=self.stages, output_fmt="NCHW")
        pooled = [t.mean(dim=(2, 3)) for t in inter]
        return torch.cat([*pooled, self.trunk.forward_head(final)], dim=-1)


class DihedralTTA(nn.Module):
    """Mean of a feature module's output over the eight dihedral transforms of its (square) input crops."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.feature_dim = int(getattr(module, "feature_dim", None) or module.num_features)
        self.num_features = self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mean ``(batch, feature_dim)`` features over rotations by 0/90/180/270° with and without a flip."""
        total = None
        for flip in (False, True):
            base = torch.flip(x, dims=(3,)) if flip else x
            for k in range(4):
                f = self.module(torch.rot90(base, k, dims=(2, 3)) if k else base).float()
                total = f if total is None else total + f
        return total / 8.0
