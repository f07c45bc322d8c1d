"""The user-facing HyperST model: it owns its life cycle (setup → train → predict/embeddings → save/load).

The pieces it drives live in their own rooms: data registration (:mod:`hyperst.tl._setup`), the data
modules and splitter (:mod:`hyperst.data`), the network (:mod:`hyperst.nn`), the training plan and runner
(:mod:`hyperst.tl._train`), prediction on tables and SpatialData (:mod:`hyperst.tl._predict`) and model
folders (:mod:`hyperst.tl._io`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from hyperst._logging import logger
from hyperst._utils import jsonable, resolve_device
from hyperst.nn import HyperSTConfig, HyperSTNetwork, ImageHyperST
from hyperst.tl._lora import LoraSpec
from hyperst.tl._options import DataOptions, ImageOptions, TrainerOptions, TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from hyperst.data import FeatureData, SpotDataModule
    from hyperst.tl._setup import TrainingData

__all__ = ["HyperST"]


class HyperST:
    """HyperST: the user-facing model, from data registration to training, prediction and save/load.

    The life cycle (scvi-tools style)::

        model = hst.tl.HyperST.setup(adata, genes=genes, config={"emb_dim": 256})  # register + build
        model.train(hst.tl.TrainOptions(max_epochs=100, lr=1e-3))                    # Lightning
        pred = model.predict(test_adata)                                              # AnnData
        emb = model.get_embeddings()                                                  # stream -> array
        model.save("model/"); model = hst.tl.HyperST.load("model/")

    :func:`hyperst.tl.fit` and :func:`hyperst.tl.predict` are thin wrappers over these verbs. The
    constructor builds an (untrained) model from a configuration; :meth:`setup` builds one from data.

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
        #: registered training data (:meth:`setup`); ``None`` for models built from a configuration or loaded
        self.registered: TrainingData | None = None
        self.data_options = DataOptions()
        self.image_options = ImageOptions()
        self.preset = str(self.training.get("preset", "custom"))

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

    def crop_features(self, crops: Any, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Features of uint8 crops ``(n, s, s, 3)`` from the fine-tuned backbone (LoRA models only).

        ``crops`` is an array or a :class:`~hyperst.data.StackedCrops` (read batch by batch).
        """
        from hyperst.pp import extract_features

        if self.image_backbone is None:
            raise ValueError("This model was trained on frozen features: compute them with `hst.pp.image_features`.")
        source = crops.batches(batch_size) if hasattr(crops, "batches") else crops
        return extract_features(self.image_backbone, source, device=self.device, batch_size=batch_size,
                                n_total=len(crops), progress=progress)

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


    # ------------------------------------------------------------------ life cycle
    @classmethod
    def setup(
        cls,
        data: Any,
        *,
        mode: Literal["frozen", "lora"] = "frozen",
        genes: Sequence[str] | None = None,
        preset: str = "hyperst",
        config: Mapping[str, Any] | None = None,
        options: DataOptions | None = None,
        image: ImageOptions | None = None,
        seed: int = 42,
        device: str = "auto",
        progress: bool = True,
    ) -> HyperST:
        """Register training data and build an untrained model for it.

        Reads the training tables, genes, targets and image inputs (frozen features, computed for
        SpatialData that lack them, or LoRA crops), then builds the network (and, for LoRA, the backbone
        with adapters) seeded with ``seed``. Only missing image features are written to ``data``.

        Parameters
        ----------
        data
            One AnnData/SpatialData or a list of them (``"lora"`` needs SpatialData).
        mode
            ``"frozen"`` (backbone features, heads train) or ``"lora"`` (end to end with adapters).
        genes
            Genes to predict (default: ``.var["hyperst_selected"]`` of the first table, else HMHVG).
        preset, config
            Model variant (:data:`hyperst.nn.PRESETS`) and overrides of :class:`hyperst.nn.HyperSTConfig`.
        options
            Which spots and values to train on (:class:`~hyperst.tl.DataOptions`).
        image
            Backbone, LoRA and crop settings (:class:`~hyperst.tl.ImageOptions`).
        seed
            Seed of the initialisation.
        device
            Device for image features computed here.
        progress
            Show progress bars.

        Returns
        -------
        An untrained model that knows its training data; call :meth:`train` next.
        """
        from hyperst.tl._setup import register

        options = options or DataOptions()
        image = image or ImageOptions()
        probe = HyperSTConfig.from_preset(preset, n_genes=1, image_dim=1, **(config or {}))
        reg = register(data, mode=mode, genes=genes, options=options, image=image,
                       niche_features=probe.has_niche, device=device, progress=progress)
        image_model = lora_spec = None
        if mode == "lora":
            from hyperst.pp import load_backbone, resolve_backbone_spec
            from hyperst.tl._lora import ResizeTo, add_lora

            spec = resolve_backbone_spec(image.backbone)
            if image.weights is not None:
                spec.weights = str(image.weights)
            reg.backbone = spec.to_dict()
            torch.manual_seed(seed)
            trunk = load_backbone(spec, random_init=image.random_init)
            lora = image.lora
            lora_spec = add_lora(trunk, LoraSpec.from_dict(lora) if isinstance(lora, Mapping) else lora)
            image_dim = int(trunk.feature_dim)
        else:
            image_dim = reg.spot.shape[1]
        cfg = HyperSTConfig.from_preset(preset, n_genes=len(reg.genes), image_dim=image_dim, **(config or {}))
        if cfg.uses_alignment and cfg.has_niche:
            reg.add_niche_targets(options)
        torch.manual_seed(seed)
        if mode == "lora":
            image_model = ImageHyperST(ResizeTo(trunk, spec.input_size), cfg)
        model = cls(
            cfg,
            genes=reg.genes,
            backbone=reg.backbone,
            crop_geometry=reg.crop_geometry,
            preprocessing={"targets": "log2p1", "normalize": bool(options.normalize), "layer": options.layer,
                           **reg.spot_geometry},
            network=None if image_model is None else image_model.network,
            image_model=image_model,
            lora=lora_spec,
        )
        model.registered = reg
        model.data_options = options
        model.image_options = image
        model.preset = preset
        return model

    def datamodule(self, options: TrainOptions | None = None) -> SpotDataModule:
        """The data module over the registered spots.

        Split by :class:`hyperst.data.DataSplitter` (with :attr:`data_options` and ``options.seed``), served
        as features (:class:`~hyperst.data.FeatureDataModule`) or crops (:class:`~hyperst.data.CropDataModule`).
        """
        from hyperst.data import CropDataModule, DataSplitter, FeatureData, FeatureDataModule

        reg = self._registered()
        options = options or TrainOptions()
        opts = self.data_options
        train_mask, val_mask, split = DataSplitter(
            reg.samples, reg.coords, validation=opts.validation, val_fraction=opts.val_fraction, seed=options.seed
        ).split()
        loader = {"batch_size": options.batch_size, "seed": options.seed, "num_workers": options.num_workers}
        niche = reg.niche if self.config.has_niche else None
        if reg.mode == "lora":
            targets = {"targets": reg.targets}
            if reg.niche_targets is not None:
                targets["niche_targets"] = reg.niche_targets
            dm: SpotDataModule = CropDataModule(
                reg.spot, niche, targets, train_mask, val_mask, mean=self.backbone["mean"],
                std=self.backbone["std"], augment=self.image_options.augment, **loader,
            )
        else:
            arrays = FeatureData(spot=reg.spot, niche=niche, targets=reg.targets, niche_targets=reg.niche_targets)
            dm = FeatureDataModule(arrays, train_mask, val_mask, **loader)
        dm.split = split
        return dm

    def train(
        self, options: TrainOptions | None = None, *, hardware: TrainerOptions | None = None, **overrides: Any
    ) -> HyperST:
        """Train on the registered data (Lightning; early stopping and best weights on the validation loss).

        Parameters
        ----------
        options
            Optimisation settings (:class:`~hyperst.tl.TrainOptions`).
        hardware
            Devices, precision and strategy (:class:`~hyperst.tl.TrainerOptions`).
        **overrides
            Single fields of ``options`` (``model.train(max_epochs=50)``).

        Returns
        -------
        The model, trained in place, with :attr:`history` and :attr:`training` filled.
        """
        from dataclasses import replace

        from hyperst.tl._train import run_training

        options = options or TrainOptions()
        if overrides:
            options = replace(options, **overrides)
        hardware = hardware or TrainerOptions()
        reg = self._registered()
        dm = self.datamodule(options)
        logger.info(f"training on {dm.n_train} spots, validating on {dm.n_val} ({dm.split})")
        if dm.n_train < 2:
            raise ValueError(f"Only {dm.n_train} training spots: the contrastive loss needs batches of at least 2.")
        module = self.image_model if self.image_model is not None else self.network
        result = run_training(module, dm, options, hardware)
        self.to(hardware.device)
        self.network.eval()
        self.history = result["history"]
        self.training = {
            "mode": reg.mode,
            "preset": self.preset,
            "validation": dm.split,
            "n_train": dm.n_train,
            "n_val": dm.n_val,
            "validation_samples": sorted(set(reg.samples[dm.val_mask])) if dm.split.startswith("slides") else None,
            "max_epochs": options.max_epochs,
            "epochs": result["epochs"],
            "global_step": result["global_step"],
            "world_size": result["world_size"],
            "best_epoch": result["best_epoch"],
            "best_val_loss": result["best_val_loss"],
            "batch_size": options.batch_size,
            "lr": options.lr,
            "weight_decay": options.weight_decay,
            "patience": options.patience,
            "seed": options.seed,
            "precision": hardware.precision,
            "min_tissue": self.data_options.min_tissue,
        }
        return self

    @property
    def is_trained(self) -> bool:
        """Whether the model has trained (or was loaded from a trained model folder)."""
        return bool(self.history)

    def _registered(self) -> TrainingData:
        if self.registered is None:
            raise ValueError(
                "This model has no registered training data: build it with `hst.tl.HyperST.setup(data, ...)` "
                "(or `hst.tl.fit`), not from a configuration or a saved folder."
            )
        return self.registered

    def predict(self, data: AnnData | Any, **kwargs: Any) -> AnnData:
        """Predict expression from H&E alone: ``hst.tl.predict(self, data, **kwargs)``.

        See :func:`hyperst.tl.predict` for the options and the output.
        """
        from hyperst.tl._predict import predict

        return predict(self, data, **kwargs)

    @torch.inference_mode()
    def get_embeddings(
        self, data: FeatureData | None = None, *, batch_size: int = 1024, progress: bool = False
    ) -> dict[str, np.ndarray]:
        """Embeddings of every stream the model has (Lorentz space components, float32).

        Parameters
        ----------
        data
            Features and targets of the spots (the gene streams need the expression). ``None``: the
            registered training spots (for LoRA models, their crops through the fine-tuned backbone).
        batch_size
            Rows per forward pass.
        progress
            LoRA models: show the feature extraction progress.

        Returns
        -------
        ``{"image_spot", "image_niche", "gene_spot", "gene_niche"}`` → ``(n, d)``, the streams the model has.
        """
        if data is None:
            data = self.registered_features(progress=progress)
        net = self.network.eval()
        dev = self.device

        def rows(a: np.ndarray | None, sl: slice) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[sl], np.float32)).to(dev)

        embs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            out = net(rows(data.spot, sl), rows(data.niche, sl), rows(data.targets, sl), rows(data.niche_targets, sl))
            for k, v in out.embeddings.items():
                embs.setdefault(k, []).append(v.float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in embs.items()}

    def registered_features(self, *, progress: bool = False) -> FeatureData:
        """The registered training spots as :class:`~hyperst.data.FeatureData`.

        LoRA models: features of the registered crops through the fine-tuned backbone.
        """
        from hyperst.data import FeatureData

        reg = self._registered()
        spot, niche = reg.spot, reg.niche if self.config.has_niche else None
        if reg.mode == "lora":
            spot = self.crop_features(spot, progress=progress)
            niche = None if niche is None else self.crop_features(niche, progress=progress)
        return FeatureData(spot=spot, niche=niche, targets=reg.targets, niche_targets=reg.niche_targets)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, JSON-compatible (the content of ``hyperst.json``)."""
        from hyperst.tl._io import model_record

        return model_record(self)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to the directory ``path``.

        ``hyperst.json`` holds the configuration, genes, backbone, crop geometry, preprocessing and
        history; ``weights.pt`` the state dict (tensors only, loadable with ``weights_only=True``); LoRA
        models add ``backbone.pt`` (the adapters, or the whole backbone when it was randomly initialised).

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
        from hyperst.tl._io import write_model

        return write_model(self, path, overwrite=overwrite)

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
        from hyperst.tl._io import read_model

        kwargs = read_model(path)
        model = cls(kwargs.pop("config"), **kwargs)
        model.to(resolve_device(device))
        model.network.eval()
        return model
