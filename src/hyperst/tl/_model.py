"""The user-facing HyperST model: network + everything needed to predict, with save/load."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyperst._logging import logger
from hyperst._utils import jsonable
from hyperst._version import __version__
from hyperst.nn import HyperSTConfig, HyperSTNetwork, ImageHyperST
from hyperst.tl._lora import LoraSpec

__all__ = ["HyperST"]

CONFIG_FILE = "hyperst.json"
WEIGHTS_FILE = "weights.pt"
BACKBONE_FILE = "backbone.pt"
FORMAT_VERSION = 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` but CUDA is not available on this machine; use 'cpu' or 'auto'.")
    return dev


class HyperST:
    """A trained (or trainable) HyperST model with everything needed to predict.

    Created by :func:`hyperst.tl.fit` or :meth:`load`; used by :func:`hyperst.tl.predict`.

    Parameters
    ----------
    config
        Network configuration.
    genes
        Names of the predicted genes, in output order (``len(genes) == config.n_genes``).
    backbone
        Description of the image backbone that produced the features (a JSON-compatible dict, e.g.
        ``{"name": "tf_efficientnet_lite0", "weights": "...", "mean": [...], "std": [...]}``), or ``None``
        when the model was trained on features of unknown origin.
    crop_geometry
        Spot/niche crop geometry (µm) used for the features, as a dict.
    preprocessing
        Target transform and related settings (e.g. ``{"targets": "log2p1", "normalize": False}``).
    network
        The network; a freshly initialised one when ``None``.
    history
        Per-epoch training history (list of dicts).
    training
        Training parameters (epochs, learning rate, split, …).
    image_model
        LoRA mode: the fine-tuned backbone and the network together (its ``network`` is ``network``).
    lora
        LoRA mode: where the adapters sit (needed to rebuild the backbone on load).
    """

    def __init__(
        self,
        config: HyperSTConfig,
        *,
        genes: Sequence[str],
        backbone: Mapping[str, Any] | None = None,
        crop_geometry: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        network: HyperSTNetwork | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
        training: Mapping[str, Any] | None = None,
        image_model: ImageHyperST | None = None,
        lora: LoraSpec | None = None,
    ) -> None:
        genes = [str(g) for g in genes]
        if len(genes) != config.n_genes:
            raise ValueError(f"`genes` has {len(genes)} names but `config.n_genes` is {config.n_genes}.")
        if len(set(genes)) != len(genes):
            raise ValueError("`genes` contains duplicates.")
        self.config = config
        self.genes = genes
        # records read back from .h5ad hold numpy arrays and scalars: keep plain Python (JSON-compatible)
        self.backbone = jsonable(dict(backbone)) if backbone is not None else None
        self.crop_geometry = jsonable(dict(crop_geometry)) if crop_geometry is not None else None
        self.preprocessing = jsonable(dict(preprocessing or {"targets": "log2p1", "normalize": False}))
        if image_model is not None:
            if network is not None and network is not image_model.network:
                raise ValueError("`network` must be `image_model.network` when both are given.")
            network = image_model.network
        self.network = network if network is not None else HyperSTNetwork(config)
        self.image_model = image_model
        self.lora = lora
        self.history = [dict(h) for h in (history or [])]
        self.training = dict(training or {})

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the network's parameters."""
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device) -> HyperST:
        """Move the network (and a fine-tuned backbone) to ``device`` (``"auto"``: CUDA when present)."""
        (self.image_model or self.network).to(resolve_device(device))
        return self

    @property
    def image_backbone(self) -> torch.nn.Module | None:
        """The fine-tuned (LoRA) backbone, or ``None`` for models trained on frozen features."""
        return None if self.image_model is None else self.image_model.backbone.backbone

    def crop_features(self, crops: np.ndarray, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Features of uint8 crops ``(n, s, s, 3)`` from the fine-tuned backbone (LoRA models only)."""
        from hyperst.pp._backbone import extract_features

        if self.image_backbone is None:
            raise ValueError("This model was trained on frozen features: compute them with `hst.pp.image_features`.")
        return extract_features(self.image_backbone, crops, device=self.device, batch_size=batch_size,
                                progress=progress)

    def __repr__(self) -> str:
        cfg = self.config
        bb = self.backbone.get("name") if self.backbone else "unknown"
        return (
            f"HyperST({cfg.n_genes} genes, image_dim={cfg.image_dim}, emb_dim={cfg.emb_dim}, "
            f"geometry={cfg.geometry!r}, levels={cfg.levels!r}, backbone={bb!r}, epochs trained={len(self.history)})"
        )

    # ------------------------------------------------------------------ inference on features
    def check_features(self, spot: np.ndarray, niche: np.ndarray | None) -> None:
        """Raise a clear error when features do not match what the model was trained on."""
        dim = self.config.image_dim
        if spot.ndim != 2 or spot.shape[1] != dim:
            source = f" from backbone {self.backbone.get('name')!r}" if self.backbone else ""
            raise ValueError(
                f"Spot features have shape {spot.shape}; the model expects (n, {dim}) features{source}. "
                "Compute them with the same backbone as in training (`hst.pp.image_features`)."
            )
        if self.config.has_niche:
            if niche is None:
                raise ValueError("This model uses niche features; pass them (niche crops through the backbone).")
            if niche.shape != spot.shape:
                raise ValueError(f"Niche features {niche.shape} do not match spot features {spot.shape}.")
        for name, arr in (("spot", spot), ("niche", niche)):
            if arr is not None and not np.isfinite(arr).all():
                raise ValueError(f"The {name} features contain NaN or infinite values.")

    @torch.inference_mode()
    def predict_features(
        self, spot: np.ndarray, niche: np.ndarray | None = None, *, batch_size: int = 1024
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Predict expression and image embeddings from backbone features.

        Parameters
        ----------
        spot
            Spot features ``(n, image_dim)``.
        niche
            Niche features ``(n, image_dim)`` (models with niche streams).
        batch_size
            Rows per forward pass.

        Returns
        -------
        Predicted expression ``(n, G)`` (log2(1 + counts) scale, float32) and the image embeddings
        ``{"image_spot": (n, d), "image_niche": (n, d)}`` (Lorentz space components).
        """
        spot = np.asarray(spot, dtype=np.float32)
        niche = None if niche is None else np.asarray(niche, dtype=np.float32)
        self.check_features(spot, niche)
        net = self.network.eval()
        dev = self.device
        preds, embs = [], {}
        for start in range(0, len(spot), batch_size):
            s = torch.from_numpy(spot[start : start + batch_size]).to(dev)
            n = None
            if self.config.has_niche and niche is not None:
                n = torch.from_numpy(niche[start : start + batch_size]).to(dev)
            out = net(s, n)
            preds.append(out.prediction.float().cpu().numpy())
            for k, v in out.embeddings.items():
                embs.setdefault(k, []).append(v.float().cpu().numpy())
        pred = np.concatenate(preds) if preds else np.zeros((0, self.config.n_genes), np.float32)
        return pred, {k: np.concatenate(v) for k, v in embs.items()}

    def confidence(self, embedding: np.ndarray) -> np.ndarray:
        """Per-spot confidence from the hyperbolic image embedding: ``tanh(d(O, x))``.

        Entailment training pushes specific (well-determined) image embeddings away from the origin
        and keeps generic, ambiguous ones near it (MERU, Desai et al. 2023), so the geodesic distance to
        the origin orders spots by how specific their image evidence is. ``tanh`` maps it to [0, 1).
        For the Euclidean variants the Euclidean norm is used instead.
        """
        x = torch.as_tensor(np.asarray(embedding, dtype=np.float32))
        if self.config.geometry == "lorentz":
            from hyperst import geometry as geo

            c = float(self.network.curvature.detach().cpu())
            radius = geo.dist(torch.zeros_like(x), x, c)
        else:
            radius = x.norm(dim=-1)
        return torch.tanh(radius).numpy()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, JSON-compatible."""
        return {
            "format_version": FORMAT_VERSION,
            "hyperst_version": __version__,
            "config": self.config.to_dict(),
            "genes": self.genes,
            "backbone": jsonable(self.backbone),
            "crop_geometry": jsonable(self.crop_geometry),
            "preprocessing": jsonable(self.preprocessing),
            "training": jsonable(self.training),
            "history": jsonable(self.history),
            "lora": None if self.lora is None else self.lora.to_dict(),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to the directory ``path``.

        ``hyperst.json`` holds the configuration, genes, backbone, crop geometry, preprocessing and
        history; ``weights.pt`` the state dict (tensors only, loadable with ``weights_only=True``).

        Parameters
        ----------
        path
            Directory (created if needed).
        overwrite
            Replace an existing saved model in ``path``.

        Returns
        -------
        The directory.
        """
        path = Path(path)
        if (path / CONFIG_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass `overwrite=True` to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        torch.save(state, path / WEIGHTS_FILE)
        if self.image_backbone is not None:
            # adapters only when the base weights can be reloaded from their file; the whole backbone when
            # it was randomly initialised (tests, timing runs)
            bb = self.image_backbone.state_dict()
            keep = bb if not (self.backbone or {}).get("weights") else {k: v for k, v in bb.items() if "lora_" in k}
            torch.save({k: v.detach().cpu().contiguous() for k, v in keep.items()}, path / BACKBONE_FILE)
        (path / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        logger.info(f"saved model to {path}")
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> HyperST:
        """Load a model written by :meth:`save` (``weights_only=True``; a GPU-trained model loads on CPU).

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        device
            Where to put the network (``"auto"``: CUDA when present).
        """
        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} does not hold a saved HyperST model ({CONFIG_FILE} + {WEIGHTS_FILE}).")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer hyperst (format {meta['format_version']}); upgrade hyperst."
            )
        config = HyperSTConfig.from_dict(meta["config"])
        dev = resolve_device(device)
        network = HyperSTNetwork(config)
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        image_model = lora = None
        if meta.get("lora"):
            image_model, lora = _load_lora_backbone(path, meta, config, network)
        model = cls(
            config,
            genes=meta["genes"],
            backbone=meta.get("backbone"),
            crop_geometry=meta.get("crop_geometry"),
            preprocessing=meta.get("preprocessing"),
            network=network,
            history=meta.get("history"),
            training=meta.get("training"),
            image_model=image_model,
            lora=lora,
        )
        model.to(dev)
        model.network.eval()
        return model


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

