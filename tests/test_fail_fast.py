"""Options that can be checked without the backbone fail before torch, timm or any image
decoding: one line, the documented exit code, nothing imported that costs seconds."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY, make_dataset
from test_warm import tlearn

from tlearn.backbone.layers import layer_names
from tlearn.cache.remembered import check_layers, recall_layers, remember_layers
from tlearn.core.errors import UsageError
from tlearn.core.known_layers import KNOWN_LAYERS


@pytest.mark.parametrize("model", sorted(KNOWN_LAYERS))
def test_bundled_backbones_cut_points_equal_timms(model):
    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False)
    known = recall_layers(None, model)
    assert known == layer_names(net, model)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--val-split", "1.5"], 2, "--val-split 1.5"),
        (["--head", "linear", "--val-split", "0"], 2, "--val-split 0"),
        (["--head", "linear", "--freeze-to", "nonsense"], 2, "unknown layer 'nonsense'"),
        (["--layer", "blocks.99"], 2, "unknown layer 'blocks.99'"),
        (["--head", "linear", "--layer", "-9"], 2, "stage index out of range"),
        (["--C", "-1"], 2, "--C -1"),
        (["--head", "mlp", "--hidden", "0"], 2, "--hidden"),
        (["--head", "linear", "--dropout", "0.99", "--lr", "-1"], 2, "--lr"),
    ],
)
def test_fit_fails_before_torch_loads(tmp_path, extra, code, message):
    data = tmp_path / "data"
    make_dataset(data, n=2)
    rc, _, err, heavy = tlearn(["fit", data, "-o", tmp_path / "m", *extra], tmp_path / "c")
    assert rc == code, err
    assert message in err
    assert heavy == [], f"loaded {heavy} before refusing {extra}"
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("head", [[], ["--head", "linear"]])
def test_an_empty_folder_fails_before_torch_loads(tmp_path, head):
    (tmp_path / "data" / "a").mkdir(parents=True)
    rc, _, err, heavy = tlearn(["fit", tmp_path / "data", "-o", tmp_path / "m", *head], tmp_path)
    assert rc == 1 and ("no image files" in err or "no class" in err), err
    assert heavy == []


def test_other_models_layers_are_remembered_after_a_first_run(tmp_path):
    """test_resnet is not bundled: its cut points are unknown until a run loads it, then
    remembered, and the next typo fails before torch."""
    root = tmp_path / "cache"
    assert recall_layers(root, "test_resnet") is None
    check_layers(root, "test_resnet", "nonsense")  # unknown model: checked later, by loading
    data = tmp_path / "data"
    make_dataset(data, n=2)
    rc, _, err, _ = tlearn(
        ["extract", data, "-o", tmp_path / "f.csv", "--model", "test_resnet", *TINY[2:]], root
    )
    assert rc == 0, err
    assert recall_layers(root, "test_resnet") is not None
    with pytest.raises(UsageError, match="did you mean layer"):
        check_layers(root, "test_resnet", "layer")
    args = ["fit", data, "-o", tmp_path / "m", "--model", "test_resnet", "--layer", "nope"]
    rc, _, err, heavy = tlearn([*args, *TINY[2:]], root)
    assert rc == 2 and "unknown layer 'nope'" in err and heavy == []
    remember_layers(root, recall_layers(root, "test_resnet"))  # idempotent
