"""Checkpoint reading and key mapping for :func:`hyperst.pp.load_backbone`.

:func:`read_checkpoint` reads a tensor ``state_dict`` safely (``torch.load(weights_only=True)`` or
safetensors, unwrapping ``{"state_dict": ...}``/``{"model": ...}`` and ``module.``/``_orig_mod.``
prefixes); :func:`load_state` maps it onto a timm model (timm's own ``checkpoint_filter_fn``,
lukemelas-style EfficientNet(-Lite) by position, Hugging Face transformers ViT names), checks every
tensor and loads it. A new checkpoint layout goes here.
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperst._logging import logger

__all__ = ["load_state", "read_checkpoint"]

#: how many offending keys an error message lists
_N_SHOW = 5


def _sniff(path: Path) -> str:
    """What the first bytes of ``path`` say: ``"zip"``, ``"pickle"``, ``"safetensors"``, ``"empty"`` or ``"other"``."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save since torch 1.6
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"  # legacy torch.save (a pickle protocol header)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    return "other"


def _not_a_checkpoint(path: Path, what: str) -> ValueError:
    return ValueError(
        f"Backbone weights {str(path)!r} are not a PyTorch checkpoint: {what}. The file is corrupt or truncated "
        "(download or copy it again), or it is in another format; expected a torch.save(state_dict) file "
        "(.pth/.pt/.bin) or a .safetensors file."
    )


def _torch_reason(err: BaseException) -> str:
    """The informative part of a ``torch.load`` error, on one line without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global| Please|$)", text, flags=re.M)
    if found:
        return found.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"{type(err).__name__}: {first.split('. ')[0].rstrip('.')}"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor ``state_dict`` from ``path`` (safely: no arbitrary unpickling).

    Raises
    ------
    ValueError
        The file is empty, corrupt, truncated or not a checkpoint (the message says which and names the
        path), holds Python objects besides tensors, or holds no ``state_dict`` of tensors.
    """
    kind = _sniff(path)
    if kind == "empty":
        raise _not_a_checkpoint(path, "the file is empty (0 bytes)")
    if path.suffix == ".safetensors" or kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            if path.suffix != ".safetensors":  # only the header looked like safetensors
                raise _not_a_checkpoint(path, "neither a torch.save archive nor a pickle") from None
            raise _not_a_checkpoint(path, f"not a valid .safetensors file ({err})") from None
    else:
        if kind == "other":
            raise _not_a_checkpoint(
                path, "neither a torch.save zip archive nor a legacy torch pickle (its first bytes match neither)"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"Checkpoint {str(path)!r} holds more than tensors (Python objects) and cannot be read safely "
                f"(torch.load(weights_only=True): {_torch_reason(err)}). Re-save it as "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from None
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
            detail = _torch_reason(err)
            what = "a truncated or damaged zip archive" if kind == "zip" else "a pickle that torch cannot read"
            raise _not_a_checkpoint(path, f"{what} ({detail})") from None
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_dict(obj):
        keys = list(obj)[:_N_SHOW] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"Checkpoint {str(path)!r} is not a state_dict of tensors (found {keys}); expected a plain state_dict "
            "or a dict wrapping one under 'state_dict' or 'model'."
        )
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: Mapping[str, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = (clf,) if isinstance(clf, str) else tuple(clf or ())
    return tuple(f"{n}." for n in names)


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    name: str,
    num_classes: int,
    key_prefix: str | None,
    source: Path,
) -> None:
    """Convert ``state`` to ``model``'s names if needed, verify every tensor and load it."""
    if key_prefix:
        state = {k[len(key_prefix) :]: v for k, v in state.items() if k.startswith(key_prefix)}
        if not state:
            raise ValueError(f"No checkpoint key in {str(source)!r} starts with key_prefix={key_prefix!r}.")
    target = model.state_dict()
    if _is_lukemelas_efficientnet(state):
        state = _map_by_position_lukemelas(state, target, name=name, num_classes=num_classes)
    elif _is_hf_vit(state):
        state = _convert_hf_vit(state)
        logger.info("Converted a Hugging Face transformers ViT checkpoint to timm names.")
    head = _classifier_prefixes(model) if num_classes == 0 else ()
    if head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}

    problems = _compare(state, target)
    if problems:
        filtered = _timm_filter(model, state)
        if filtered is not None:
            if head:
                filtered = {k: v for k, v in filtered.items() if not k.startswith(head)}
            if not _compare(filtered, target):
                logger.warning(
                    f"Checkpoint {source.name} was adapted to {name} by timm's checkpoint_filter_fn "
                    "(renamed keys and/or resampled position embeddings)."
                )
                state, problems = filtered, ""
    if problems:
        raise ValueError(f"Checkpoint {str(source)!r} does not fit backbone {name!r}: {problems}")
    for k, v in target.items():  # BatchNorm counters are not weights; fill them when absent
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = v
    model.load_state_dict(state, strict=True)


def _compare(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """Describe key/shape differences between a checkpoint and a model ('' when they fit)."""
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - _N_SHOW} more)" if len(items) > _N_SHOW else ""
            parts.append(f"{len(items)} {label}: {items[:_N_SHOW]}{more}")
    return "; ".join(parts)


def _timm_filter(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Apply the ``checkpoint_filter_fn`` of the model's timm module, if any (``None`` on failure)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return None
    try:
        return dict(fn(dict(state), model))
    except Exception:  # a filter that does not apply is not an error by itself
        return None


# lukemelas EfficientNet(-Lite) -> timm, by position
def _is_lukemelas_efficientnet(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def _map_by_position_lukemelas(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, name: str, num_classes: int
) -> dict[str, torch.Tensor]:
    """Map lukemelas-style keys onto timm EfficientNet keys by position, checking shape and kind."""
    if "conv_stem.weight" not in target:
        raise ValueError(
            f"The checkpoint is a lukemelas-style EfficientNet (keys '_conv_stem', '_blocks'), but backbone "
            f"{name!r} is not a timm EfficientNet; use e.g. 'tf_efficientnet_lite0'."
        )
    if not name.startswith("tf_"):
        logger.warning(
            f"lukemelas EfficientNet weights come from TensorFlow ('same' padding); {name!r} pads symmetrically. "
            f"Use 'tf_{name}' for identical outputs."
        )
    src = [(k, v) for k, v in state.items() if num_classes > 0 or not k.startswith("_fc.")]
    dst = list(target.items())
    if len(src) != len(dst):
        raise ValueError(
            f"lukemelas EfficientNet checkpoint has {len(src)} tensors but {name!r} (num_classes={num_classes}) "
            f"has {len(dst)}; the variants differ (e.g. lite0 vs lite1) or the classifier sizes differ."
        )
    bad = [
        f"{ks} {tuple(vs.shape)} -> {kd} {tuple(vd.shape)}"
        for (ks, vs), (kd, vd) in zip(src, dst, strict=True)
        if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]
    ]
    if bad:
        more = f" (+{len(bad) - _N_SHOW} more)" if len(bad) > _N_SHOW else ""
        raise ValueError(
            f"lukemelas EfficientNet checkpoint does not map onto {name!r} by position; {len(bad)} tensors differ "
            f"in shape or kind: {bad[:_N_SHOW]}{more}"
        )
    return {kd: vs for (_, vs), (kd, _) in zip(src, dst, strict=True)}


# Hugging Face transformers ViT (Phikon) -> timm
_HF_VIT_DETECT = re.compile(
    r"(^|\.)(encoder\.layer\.\d+\.attention\.attention\.query\.weight|layers\.\d+\.attention\.q_proj\.weight)$"
)
_HF_VIT_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_VIT_RENAME = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_VIT_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_VIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _is_hf_vit(state: Mapping[str, torch.Tensor]) -> bool:
    return any(_HF_VIT_DETECT.search(k) for k in state) and any(
        k.endswith("embeddings.patch_embeddings.projection.weight") for k in state
    )


def _convert_hf_vit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``ViTModel`` state_dict to timm ``VisionTransformer`` names."""
    anchor = next(k for k in state if k.endswith("embeddings.patch_embeddings.projection.weight"))
    prefix = anchor[: -len("embeddings.patch_embeddings.projection.weight")]  # e.g. "vit." for classifiers
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, val in state.items():
        if not key.startswith(prefix):
            if key.startswith("classifier."):  # ViTForImageClassification head
                continue
            out[key] = val
            continue
        k = key[len(prefix) :]
        if k.startswith(("pooler.", "embeddings.mask_token")):
            continue
        if k in _HF_VIT_TOP:
            out[_HF_VIT_TOP[k]] = val
            continue
        m = _HF_VIT_BLOCK.match(k)
        if m is None:
            out[key] = val  # left as is: reported as unexpected
            continue
        idx, rest = m.groups()
        stem, _, kind = rest.rpartition(".")
        if stem in _HF_VIT_QKV:
            qkv.setdefault((idx, kind), {})[_HF_VIT_QKV[stem]] = val
        elif stem in _HF_VIT_RENAME:
            out[f"blocks.{idx}.{_HF_VIT_RENAME[stem]}.{kind}"] = val
        else:
            out[key] = val
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"transformers ViT checkpoint: layer {idx} lacks some of query/key/value {kind}.")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
