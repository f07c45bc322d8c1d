"""LoRA adapters on an image backbone (end-to-end fine-tuning, METHOD §2: r = 8, α = 16, dropout 0.1)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraSpec", "ResizeTo", "add_lora"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class LoraSpec:
    """Where and how LoRA adapters are added to a backbone.

    Parameters
    ----------
    r
        Rank of the adapters.
    alpha
        LoRA scaling ``alpha`` (the update is scaled by ``alpha / r``).
    dropout
        Dropout on the adapter input.
    last_n_blocks
        Adapt only modules inside the last ``n`` entries of the backbone's ``blocks`` (timm's name for
        the transformer blocks / CNN stages); ``None``: everywhere.
    target_modules
        Module name suffixes to adapt. ``None``: ``attn.qkv`` when the backbone has it (ViTs, as the
        reference on UNI), else the 1×1 convolutions and linear layers of the selected blocks.
    modules
        The exact module names adapted (filled by :func:`add_lora`, used to rebuild the model on load).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    last_n_blocks: int | None = 11
    target_modules: list[str] | None = None
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(data))


def _candidates(backbone: nn.Module, spec: LoraSpec) -> list[str]:
    names = dict(backbone.named_modules())
    blocks = sorted({int(m.group(1)) for n in names if (m := _BLOCK.search(n + "."))})
    keep_blocks = set(blocks[-spec.last_n_blocks :]) if spec.last_n_blocks and blocks else set(blocks)

    def in_blocks(name: str) -> bool:
        if spec.last_n_blocks is None:
            return True
        m = _BLOCK.search(name + ".")
        return m is not None and int(m.group(1)) in keep_blocks

    suffixes = spec.target_modules
    if suffixes is None:
        suffixes = ["attn.qkv"] if any(n.endswith("attn.qkv") for n in names) else None
    out = []
    for name, module in names.items():
        if not name or not in_blocks(name):
            continue
        if suffixes is not None:
            if any(name == s or name.endswith("." + s) for s in suffixes):
                out.append(name)
        elif isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        ):
            out.append(name)
    return out


def add_lora(backbone: nn.Module, spec: LoraSpec | None = None) -> LoraSpec:
    """Inject LoRA adapters into ``backbone`` in place and make only them trainable.

    Parameters
    ----------
    backbone
        A (frozen) image backbone, e.g. from :func:`hyperst.pp.load_backbone`.
    spec
        Where and how; default :class:`LoraSpec` (reference settings). When ``spec.modules`` is set
        (a spec read back from a saved model), exactly those modules are adapted.

    Returns
    -------
    The spec with ``modules`` filled in.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA training needs peft: `pip install 'hyperst[lora]'`.") from err
    spec = LoraSpec(**asdict(spec)) if spec is not None else LoraSpec()
    modules = list(spec.modules) or _candidates(backbone, spec)
    if not modules:
        raise ValueError(
            "No module of the backbone matches the LoRA targets "
            f"(target_modules={spec.target_modules}, last_n_blocks={spec.last_n_blocks}); pass `target_modules`."
        )
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=modules)
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    spec.modules = modules
    return spec


class ResizeTo(nn.Module):
    """Resize normalised crops to the backbone's input size (bilinear, antialiased) before it runs."""

    def __init__(self, backbone: nn.Module, size: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.backbone(x)

