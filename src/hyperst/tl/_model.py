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
from hyperst._utils import BatchSizer, jsonable, resolve_device, restore_on_error
from hyperst.nn import HyperSTConfig, HyperSTNetwork, ImageHyperST
from hyperst.tl._domain import DomainReference
from hyperst.tl._lora import LoraSpec
from hyperst.tl._options import DataOptions, ImageOptions, TrainerOptions, TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from hyperst.data import FeatureData, SpotDataModule
    from hyperst.tl._depth import DepthModel
    from hyperst.tl._setup import TrainingData
    from hyperst.tl._uncertainty import Calibration

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
    members
        Ensemble members (networks of the same configuration); ``members[0]`` is :attr:`network`. Default:
        ``[network]``.
    member_histories
        Per-epoch history of every member (``member_histories[0]`` is ``history``).
    calibration
        Held-out residuals of the members: the prediction intervals (:class:`~hyperst.tl._uncertainty.Calibration`).
    domain
        Training-domain reference of the domain-shift checks (:class:`~hyperst.tl._domain.DomainReference`).
    depth
        Normalised-target models: the image → log2(1 + library size) regression (``.obs["hyperst_log2_depth"]``).
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
        members: Sequence[HyperSTNetwork] | None = None,
        member_histories: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        calibration: Calibration | None = None,
        domain: DomainReference | None = None,
        depth: DepthModel | None = None,
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
        if members is not None:
            members = list(members)
            if network is not None and members[0] is not network:
                raise ValueError("`members[0]` must be `network` when both are given.")
            network = members[0]
        network = network if network is not None else HyperSTNetwork(config)
        #: the ensemble members; ``members[0]`` is :attr:`network`
        self.members: list[HyperSTNetwork] = members if members is not None else [network]
        if image_model is not None and len(self.members) > 1:
            raise ValueError("LoRA models have one member.")
        self.image_model = image_model
        self.lora = lora
        self.history = [dict(h) for h in (history or [])]
        self.member_histories = [[dict(h) for h in m] for m in (member_histories or [self.history])]
        self.calibration = calibration
        self.domain = domain
        self.depth = depth  # the image → log2(1 + library size) regression of normalised-target models
        self.training = dict(training or {})
        #: registered training data (:meth:`setup`); ``None`` for models built from a configuration or loaded
        self.registered: TrainingData | None = None
        self.data_options = DataOptions()
        self.image_options = ImageOptions()
        self.preset = str(self.training.get("preset", "custom"))

    # ------------------------------------------------------------------ properties
    @property
    def network(self) -> HyperSTNetwork:
        """The first ensemble member (the embeddings and :meth:`get_embeddings` come from it)."""
        return self.members[0]

    @network.setter
    def network(self, value: HyperSTNetwork) -> None:
        if hasattr(self, "members"):
            self.members[0] = value
        else:
            self.members = [value]

    @property
    def n_members(self) -> int:
        """Number of ensemble members."""
        return len(self.members)

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters."""
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device) -> HyperST:
        """Move the network (and a fine-tuned backbone) to ``device`` (``"auto"``: CUDA when present)."""
        dev = resolve_device(device)
        (self.image_model or self.network).to(dev)
        for m in self.members[1:]:
            m.to(dev)
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
            f"geometry={cfg.geometry!r}, levels={cfg.levels!r}, backbone={bb!r}, members={self.n_members}, "
            f"epochs trained={len(self.history)})"
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
    def predict_members(
        self, spot: np.ndarray, niche: np.ndarray | None = None, *, batch_size: int = 1024
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every member's prediction from backbone features, and the first member's image embeddings.

        Predictions are clamped at 0: on the log2(1 + counts) scale no value is below 0, and for targets
        ≥ 0 clamping never increases an error.

        Returns
        -------
        ``(K, n, G)`` float32 predictions and ``{"image_spot": (n, d), "image_niche": (n, d)}``.
        """
        spot = np.asarray(spot, dtype=np.float32)
        niche = None if niche is None else np.asarray(niche, dtype=np.float32)
        self.check_features(spot, niche)
        dev = self.device
        preds: list[list[np.ndarray]] = [[] for _ in self.members]
        embs: dict[str, list[np.ndarray]] = {}

        def forward(start: int, stop: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
            s = torch.from_numpy(spot[start:stop]).to(dev)
            n = None
            if self.config.has_niche and niche is not None:
                n = torch.from_numpy(niche[start:stop]).to(dev)
            outs, first = [], {}
            for i, net in enumerate(self.members):
                out = net.eval()(s, n)
                outs.append(out.prediction.float().clamp_min(0).cpu().numpy())
                if i == 0:
                    first = {k: v.float().cpu().numpy() for k, v in out.embeddings.items()}
            return outs, first

        for outs, first in BatchSizer(batch_size, what="spots").run(forward, len(spot)):  # backs off on CUDA OOM
            for i, o in enumerate(outs):
                preds[i].append(o)
            for k, v in first.items():
                embs.setdefault(k, []).append(v)
        g = self.config.n_genes
        stacked = np.stack([np.concatenate(p) if p else np.zeros((0, g), np.float32) for p in preds])
        return stacked, {k: np.concatenate(v) for k, v in embs.items()}

    def predict_features(
        self, spot: np.ndarray, niche: np.ndarray | None = None, *, batch_size: int = 1024
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Predict expression (the ensemble mean) and image embeddings from backbone features.

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
        Predicted expression ``(n, G)`` (log2(1 + counts) scale, ≥ 0, float32; the mean over the members of
        :meth:`predict_members`) and the first member's image embeddings ``{"image_spot": (n, d),
        "image_niche": (n, d)}`` (Lorentz space components).
        """
        preds, embs = self.predict_members(spot, niche, batch_size=batch_size)
        return preds.mean(0).astype(np.float32), embs

    def radius(self, embedding: np.ndarray) -> np.ndarray:
        """Hyperbolic radius ``d(O, x)`` of image embeddings (Euclidean norm for the Euclidean variants).

        A diagnostic of the learned hierarchy (the streams sit at different radii: :func:`hyperst.pl.radius`),
        **not** a confidence: on held-out Her2ST sections the spot radius does not order spots by how well
        they are predicted (Spearman with the error −0.08 to +0.20, ``docs/benchmarks.md``). For how far to
        trust a prediction use the intervals and the domain checks of :func:`hyperst.tl.predict`.
        """
        x = torch.as_tensor(np.asarray(embedding, dtype=np.float32))
        if self.config.geometry == "lorentz":
            from hyperst import geometry as geo

            c = float(self.network.curvature.detach().cpu())
            return geo.dist(torch.zeros_like(x), x, c).numpy()
        return x.norm(dim=-1).numpy()

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
        with restore_on_error(data if isinstance(data, Sequence) else [data]):  # a failed setup changes nothing
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
        requested = 1 if mode == "lora" and options.n_members == "auto" else options.n_members
        n_members = cls._splitter(reg, options).n_members(requested)
        if mode == "lora" and n_members > 1:
            raise ValueError(
                f"`n_members={n_members}`: LoRA models train one member (each member would fine-tune its own "
                "backbone); pass `n_members=1`, or ensemble in frozen mode."
            )
        if cfg.uses_alignment and cfg.has_niche:
            reg.add_niche_targets(options)
        torch.manual_seed(seed)
        if mode == "lora":
            image_model = ImageHyperST(ResizeTo(trunk, spec.input_size), cfg)
        members = None
        if n_members > 1:
            members = [HyperSTNetwork(cfg)]
            for k in range(1, n_members):
                torch.manual_seed(seed + k)
                members.append(HyperSTNetwork(cfg))
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
            members=members,
        )
        model.registered = reg
        model.data_options = options
        model.image_options = image
        model.preset = preset
        return model

    @staticmethod
    def _splitter(reg: TrainingData, opts: DataOptions, seed: int = 42) -> Any:
        from hyperst.data import DataSplitter

        return DataSplitter(reg.samples, reg.coords, validation=opts.validation, val_fraction=opts.val_fraction,
                            seed=seed)

    def datamodule(self, options: TrainOptions | None = None, *, member: int = 0) -> SpotDataModule:
        """The data module of one ensemble member over the registered spots.

        Split by :meth:`hyperst.data.DataSplitter.member_splits` (with :attr:`data_options` and
        ``options.seed``; one member: :meth:`~hyperst.data.DataSplitter.split`), batches drawn with seed
        ``options.seed + member``, served as features (:class:`~hyperst.data.FeatureDataModule`) or crops
        (:class:`~hyperst.data.CropDataModule`).
        """
        from hyperst.data import CropDataModule, FeatureData, FeatureDataModule

        reg = self._registered()
        options = options or TrainOptions()
        splits = self._splitter(reg, self.data_options, options.seed).member_splits(self.n_members)
        if not 0 <= member < len(splits):
            raise ValueError(f"`member` must be in [0, {len(splits)}), got {member}.")
        train_mask, val_mask, split = splits[member]
        loader = {"batch_size": options.batch_size, "seed": options.seed + member, "num_workers": options.num_workers}
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
            arrays = FeatureData(spot=reg.spot, niche=niche, targets=reg.targets, niche_targets=reg.niche_targets,
                                 spot_views=reg.spot_views, niche_views=reg.niche_views if niche is not None else None)
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
        checkpoints = self._checkpoint_dir(options)
        records, masks = [], []
        interrupted = None
        for k, net in enumerate(self.members):
            dm = self.datamodule(options, member=k)
            tag = f"member {k + 1}/{self.n_members}: " if self.n_members > 1 else ""
            logger.info(f"{tag}training on {dm.n_train} spots, validating on {dm.n_val} ({dm.split})")
            if dm.n_train < 2:
                raise ValueError(f"Only {dm.n_train} training spots: the contrastive loss needs batches of at least 2.")
            module = self.image_model if self.image_model is not None else net
            result = None if checkpoints is None else checkpoints.finished(k, module)
            if result is None:
                result = run_training(module, dm, replace(options, seed=options.seed + k), hardware,
                                      checkpoint_dir=None if checkpoints is None else checkpoints.member(k))
                if checkpoints is not None and not result["interrupted"]:
                    checkpoints.finish(k, module, result)
            records.append({
                "member": k, "seed": options.seed + k, "validation": dm.split, "n_train": dm.n_train,
                "n_val": dm.n_val,
                "validation_samples": sorted(set(reg.samples[dm.val_mask])) if dm.split.startswith("slides") else None,
                **{key: result[key] for key in ("epochs", "global_step", "world_size", "best_epoch", "best_val_loss")},
                "history": result["history"],
            })
            masks.append(dm.val_mask)
            if result.get("interrupted"):
                interrupted = {"member": k, "signal": result.get("signal"), "epochs": result["epochs"]}
                if k + 1 < self.n_members:
                    logger.warning(f"training interrupted: the model keeps the {k + 1} member(s) trained so far "
                                   f"of {self.n_members}")
                    self.members = self.members[: k + 1]
                break
        self.to(hardware.device)
        for net in self.members:
            net.eval()
        self.member_histories = [r.pop("history") for r in records]
        self.history = self.member_histories[0]
        first = records[0]
        self.training = {
            "mode": reg.mode,
            "preset": self.preset,
            **{key: first[key] for key in ("validation", "n_train", "n_val", "validation_samples")},
            "max_epochs": options.max_epochs,
            **{key: first[key] for key in ("epochs", "global_step", "world_size", "best_epoch", "best_val_loss")},
            "batch_size": options.batch_size,
            "lr": options.lr,
            "weight_decay": options.weight_decay,
            "patience": options.patience,
            "seed": options.seed,
            "precision": hardware.precision,
            "min_tissue": self.data_options.min_tissue,
            "views": list(reg.view_names or []),
            "n_members": self.n_members,
            "interrupted": interrupted is not None,
            "members": records,
        }
        if interrupted is not None:
            self.training["interruption"] = interrupted
            if checkpoints is not None:
                logger.warning(f"resume with the same data, settings and `checkpoint_dir={str(checkpoints.path)!r}`")
        self._calibrate(masks)
        self._fit_depth(masks[0])
        return self

    def _fit_depth(self, val_mask: np.ndarray) -> None:
        """With normalised targets in frozen mode: the depth model, validated on member 1's validation spots."""
        from hyperst.tl._depth import training_depth

        reg = self._registered()
        use = self.data_options.normalize and reg.mode == "frozen"
        self.depth = training_depth(reg, self.registered_features(), self.data_options, val_mask) if use else None

    def _checkpoint_dir(self, options: TrainOptions) -> Any:
        """The :class:`~hyperst.tl._checkpoint.CheckpointDir` of ``options.checkpoint_dir`` (``None`` without)."""
        from hyperst.tl._checkpoint import checkpoint_dir

        return None if options.checkpoint_dir is None else checkpoint_dir(self, self._registered(), options)

    @property
    def interrupted(self) -> bool:
        """Whether the last training was stopped by SIGINT/SIGTERM (it keeps the best weights reached)."""
        return bool(self.training.get("interrupted", False))

    def _calibrate(self, held_out: Sequence[np.ndarray]) -> None:
        """Fit the domain reference and the interval calibration on the members' validation spots."""
        from hyperst.tl._domain import domain_reference
        from hyperst.tl._setup import training_slides
        from hyperst.tl._uncertainty import MemberResiduals, calibrate

        self.calibration = self.domain = None
        if not all(m.any() for m in held_out):
            logger.info("no validation spots: the model gives no prediction intervals nor domain checks")
            return
        reg = self._registered()
        data = self.registered_features()
        x = data.spot if data.niche is None else np.concatenate([data.spot, data.niche], axis=1)
        self.domain = domain_reference(x, reg.samples, held_out, slides=training_slides(reg),
                                       seed=int(self.training.get("seed", 0)))
        preds, _ = self.predict_members(data.spot, data.niche)  # one pass; member k is read on its held-out rows
        residuals = [MemberResiduals(preds[k][mask], data.targets[mask], x[mask]) for k, mask in enumerate(held_out)]
        self.calibration = calibrate(self.domain.space, residuals)
        n_val = sum(int(m.sum()) for m in held_out)
        logger.info(f"calibrated prediction intervals on {n_val} held-out spots of {self.n_members} member(s)")

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

