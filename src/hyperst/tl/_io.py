"""Model folders: ``hyperst.json`` (configuration, genes, provenance, history) + state dicts.

Loading never runs code: weights are read with ``torch.load(weights_only=True)`` and the JSON only names
settings. :meth:`hyperst.tl.HyperST.save` / :meth:`~hyperst.tl.HyperST.load` call these functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hyperst._logging import logger
from hyperst._utils import jsonable
from hyperst._version import __version__
from hyperst.nn import HyperSTConfig, HyperSTNetwork, ImageHyperST
from hyperst.tl._lora import LoraSpec

if TYPE_CHECKING:  # pragma: no cover
    from hyperst.tl._model import HyperST

__all__ = [
    "BACKBONE_FILE",
    "CALIBRATION_FILE",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MEMBERS_FILE",
    "WEIGHTS_FILE",
    "check_integrity",
    "model_record",
    "read_model",
    "write_model",
]

CONFIG_FILE = "hyperst.json"
WEIGHTS_FILE = "weights.pt"
BACKBONE_FILE = "backbone.pt"
#: ensemble members after the first (``"{k}.{parameter}"`` → tensor)
MEMBERS_FILE = "members.pt"
#: interval calibration and domain reference arrays (``"calibration.*"``, ``"space.*"``)
CALIBRATION_FILE = "calibration.pt"
#: 2: ensembles (members.pt), calibration.pt, member histories and the domain record
FORMAT_VERSION = 2


def model_record(model: HyperST) -> dict[str, Any]:
    """Everything but the weights, JSON-compatible."""
    return {
        "format_version": FORMAT_VERSION,
        "hyperst_version": __version__,
        "config": model.config.to_dict(),
        "genes": model.genes,
        "backbone": jsonable(model.backbone),
        "crop_geometry": jsonable(model.crop_geometry),
        "preprocessing": jsonable(model.preprocessing),
        "training": jsonable(model.training),
        "history": jsonable(model.history),
        "lora": None if model.lora is None else model.lora.to_dict(),
        "n_members": model.n_members,
        "member_histories": jsonable(model.member_histories[1:]),
        "domain": None if model.domain is None else jsonable(model.domain.record()),
        "depth": None if model.depth is None else jsonable(model.depth.record()),
    }


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _integrity(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Hashes of the tensor files, the gene list and the configuration: what :func:`read_model` checks."""
    files = {name: _sha256(path / name) for name in (WEIGHTS_FILE, MEMBERS_FILE, CALIBRATION_FILE, BACKBONE_FILE)
             if (path / name).exists()}
    return {"files": files, "genes": _digest(meta["genes"]), "config": _digest(meta["config"])}


def check_integrity(path: Path, meta: Mapping[str, Any]) -> None:
    """Refuse a model folder whose files, gene list or configuration differ from what was saved.

    Raises
    ------
    ValueError
        Naming the part that does not match (a swapped or truncated weights file, a reordered gene list, an
        edited configuration), before any tensor is read.
    """
    record = meta.get("integrity")
    if not record:
        return
    if _digest(meta["genes"]) != record.get("genes"):
        raise ValueError(f"{path / CONFIG_FILE}: the gene list differs from the one saved with the weights "
                         "(reordered or edited?); predictions would carry the wrong gene names. Re-save the model.")
    if _digest(meta["config"]) != record.get("config"):
        raise ValueError(f"{path / CONFIG_FILE}: the network configuration differs from the one saved with the "
                         "weights (edited?); re-save the model.")
    for name, digest in dict(record.get("files", {})).items():
        file = path / name
        if not file.exists():
            raise ValueError(f"{file} is missing: the model folder is incomplete.")
        if _sha256(file) != digest:
            raise ValueError(f"{file} does not match the model it was saved with (swapped, truncated or corrupt).")


def write_model(model: HyperST, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the directory ``path`` (see :meth:`hyperst.tl.HyperST.save`)."""
    path = Path(path)
    if (path / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a saved model; pass `overwrite=True` to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    extra = {f"{i}.{k}": v.detach().cpu().contiguous() for i, net in enumerate(model.members) if i
             for k, v in net.state_dict().items()}
    _replace(path / MEMBERS_FILE, extra)
    arrays: dict[str, torch.Tensor] = {}
    if model.calibration is not None and model.domain is not None:
        arrays.update({f"calibration.{k}": torch.as_tensor(v) for k, v in model.calibration.tensors().items()})
        arrays.update({f"space.{k}": torch.as_tensor(v) for k, v in model.domain.space.tensors().items()})
    if model.depth is not None:
        arrays.update({f"depth.{k}": torch.as_tensor(v) for k, v in model.depth.tensors().items()})
    _replace(path / CALIBRATION_FILE, arrays)
    if model.image_backbone is not None:
        # adapters only when the base weights can be reloaded from their file; the whole backbone when
        # it was randomly initialised (tests, timing runs)
        bb = model.image_backbone.state_dict()
        keep = bb if not (model.backbone or {}).get("weights") else {k: v for k, v in bb.items() if "lora_" in k}
        torch.save({k: v.detach().cpu().contiguous() for k, v in keep.items()}, path / BACKBONE_FILE)
    meta = model_record(model)
    meta["integrity"] = _integrity(path, meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info(f"saved model to {path}")
    return path


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``weights_only=True``; a damaged file is a ValueError naming it."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f"{file} cannot be read as a tensor file ({type(err).__name__}): the model folder is "
                         "damaged or incomplete.") from None


def _load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], file: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ValueError(f"{file} does not fit the configuration in {CONFIG_FILE}: {detail}") from None


def read_model(path: str | Path) -> dict[str, Any]:
    """The constructor arguments of :class:`hyperst.tl.HyperST` for the model folder ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"`path={str(path)!r}` does not exist; pass the folder that `model.save(path)` or "
                                "`hyperst fit --out` wrote.")
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"`path={str(path)!r}` does not hold a saved HyperST model ({CONFIG_FILE} + "
                                f"{WEIGHTS_FILE}); pass the folder that `model.save(path)` wrote.")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({err}); the model folder is damaged.") from None
    if not isinstance(meta, dict) or "config" not in meta or "genes" not in meta:
        raise ValueError(f"{path / CONFIG_FILE} is not a hyperst model record (no 'config' and 'genes').")
    check_integrity(path, meta)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer hyperst (format {meta['format_version']}); upgrade hyperst.")
    config = HyperSTConfig.from_dict(meta["config"])
    network = HyperSTNetwork(config)
    _load_state(network, _tensors(path / WEIGHTS_FILE), path / WEIGHTS_FILE)
    image_model = lora = None
    if meta.get("lora"):
        image_model, lora = _load_lora_backbone(path, meta, config, network)
    members = [network]
    n_members = int(meta.get("n_members", 1))
    if n_members > 1:
        saved = _tensors(path / MEMBERS_FILE)
        for i in range(1, n_members):
            net = HyperSTNetwork(config)
            _load_state(net, {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == str(i)},
                        path / MEMBERS_FILE)
            members.append(net)
    calibration = domain = depth = None
    arrays = _tensors(path / CALIBRATION_FILE) if (path / CALIBRATION_FILE).exists() else {}

    def part(prefix: str) -> dict[str, Any]:
        return {k[len(prefix) + 1 :]: v.numpy() for k, v in arrays.items() if k.startswith(prefix + ".")}

    if meta.get("depth") is not None and arrays:
        from hyperst.tl._depth import DepthModel

        depth = DepthModel.from_parts(meta["depth"], part("depth"))
    if meta.get("domain") is not None and arrays:
        from hyperst.tl._domain import DomainReference
        from hyperst.tl._uncertainty import Calibration, FeatureSpace

        calibration = Calibration.from_tensors(part("calibration"))
        rec = meta["domain"]
        domain = DomainReference(FeatureSpace.from_tensors(part("space")), float(rec["threshold"]),
                                 float(rec["ood_rate"]), dict(rec.get("held_out", {})), dict(rec.get("slides", {})))
    history = meta.get("history") or []
    return {
        "config": config,
        "genes": meta["genes"],
        "backbone": meta.get("backbone"),
        "crop_geometry": meta.get("crop_geometry"),
        "preprocessing": meta.get("preprocessing"),
        "network": network,
        "history": history,
        "training": meta.get("training"),
        "image_model": image_model,
        "lora": lora,
        "members": members,
        "member_histories": [history, *(meta.get("member_histories") or [[] for _ in members[1:]])],
        "calibration": calibration,
        "domain": domain,
        "depth": depth,
    }


def _replace(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path``, or remove a stale file when there are none."""
    if tensors:
        torch.save(dict(tensors), path)
    elif path.exists():
        path.unlink()


def _load_lora_backbone(
    path: Path, meta: Mapping[str, Any], config: HyperSTConfig, network: HyperSTNetwork
) -> tuple[ImageHyperST, LoraSpec]:
    """Rebuild the fine-tuned backbone of a LoRA model: base weights from their file + saved adapters."""
    from hyperst.pp._backbone import load_backbone
    from hyperst.tl._lora import ResizeTo, add_lora

    spec = meta["backbone"]
    random_base = not spec.get("weights")
    trunk = load_backbone(spec, random_init=random_base)
    lora = add_lora(trunk, LoraSpec.from_dict(meta["lora"]))
    saved = torch.load(path / BACKBONE_FILE, map_location="cpu", weights_only=True)
    if random_base:
        trunk.load_state_dict(saved)
    else:
        missing = {k for k in trunk.state_dict() if "lora_" in k} - set(saved)
        if missing:
            raise ValueError(f"{path / BACKBONE_FILE} lacks adapter weights, e.g. {sorted(missing)[:3]}.")
        trunk.load_state_dict(saved, strict=False)
    image_model = ImageHyperST(ResizeTo(trunk, trunk.hyperst_spec.input_size), config)
    image_model.network = network
    return image_model, lora

