"""Neural heads and fine-tuning: freezing, LR groups, caching, checkpoints, resume, TTA.

Tiny timm test model with random weights and generated images; 1-3 epochs each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.numpy import load_file, save_file

from tests.conftest import TINY, make_dataset
from tlearn.backbone.cut import feature_dim
from tlearn.backbone.transfer import TransferNet
from tlearn.backbone.weights import open_backbone
from tlearn.cli.app import app
from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.heads.neural import head_config
from tlearn.heads.neural_torch import NNHead
from tlearn.modeldir import load_model
from tlearn.train import checkpoint as ckpt
from tlearn.train.api import fit_nn, resume_nn
from tlearn.train.groups import plan_groups
from tlearn.train.loop import Trainer
from tlearn.train.optim import apply_freeze, build_optimizer
from tlearn.train.options import TrainOptions

MODEL = "test_efficientnet"
RUN = RunOptions(batch_size=8, workers=0)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """Smaller than conftest's: 3 classes x 4 training and x 2 validation images."""
    root = tmp_path_factory.mktemp("finetune") / "split"
    make_dataset(root / "train", n=4, seed=1)
    make_dataset(root / "val", n=2, seed=2)
    return root


N_VAL = 6
_NETS: dict = {}


def tiny_net(layer="final", head="linear"):
    """A network on the tiny model (built once per layer; plan_groups does not change it)."""
    if layer not in _NETS:
        backbone = open_backbone(MODEL, "none")
        net = TransferNet(backbone.model, [layer], "avg", None, 160)
        net.head = NNHead(head_config(head), feature_dim(net, net.input_shape), 3)
        _NETS[layer] = net
    return _NETS[layer]


def fit(data, out, **kw):
    lib = {
        k: kw.pop(k) for k in ("layers", "val", "val_split", "seed", "force", "events") if k in kw
    }
    return fit_nn(
        data, out, options=TrainOptions(**kw), model=MODEL, weights="none", run=RUN, **lib
    )


def optimizer_summary(opt) -> dict[str, tuple[int, float]]:
    """name -> (number of parameters, base learning rate) from the optimiser itself."""
    out: dict[str, tuple[int, float]] = {}
    for g in opt.param_groups:
        n, lr = out.get(g["name"], (0, g["base_lr"]))
        assert lr == g["base_lr"]
        out[g["name"]] = (n + sum(p.numel() for p in g["params"]), g["base_lr"])
    return out


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- groups


def test_layer_decay_rates_follow_the_group_matcher_and_match_the_optimizer():
    net = tiny_net()
    plan = plan_groups(net, lr=1e-3, freeze_to="blocks.2", layer_decay=0.7)
    m = net.model
    names = [r.name for r in plan.rows]
    assert names == ["conv_stem,bn1,blocks.0-2", "blocks.3", "blocks.4,conv_head,bn2", "head"]
    frozen, b3, top, head = plan.rows
    assert frozen.frozen and frozen.lr is None
    assert frozen.n_params == count(m.conv_stem) + count(m.bn1) + sum(
        count(m.blocks[i]) for i in range(3)
    )
    # timm's grouping: conv_head and bn2 join the last block's group; D per step down.
    assert top.n_params == count(m.blocks[4]) + count(m.conv_head) + count(m.bn2)
    assert head.lr == pytest.approx(1e-3)
    assert top.lr == pytest.approx(1e-3 * 0.7)
    assert b3.lr == pytest.approx(1e-3 * 0.7**2)
    opt = build_optimizer(net, plan)
    assert optimizer_summary(opt) == {r.name: (r.n_params, r.lr) for r in plan.rows if not r.frozen}
    # Frozen parameters: not in the optimiser, no gradient.
    apply_freeze(net, plan)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        if name in plan.frozen_params:
            assert id(p) not in in_opt and not p.requires_grad
    # Weight decay only on weights with more than one dimension.
    for g in opt.param_groups:
        assert (g["weight_decay"] > 0) == all(p.ndim > 1 for p in g["params"])
    sgd = build_optimizer(net, plan, optimizer="sgd", momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    assert optimizer_summary(sgd) == optimizer_summary(opt)


def test_explicit_lr_groups_with_inheritance_match_the_optimizer():
    net = tiny_net()
    spec = "conv_stem, bn1, blocks.0-1=0; blocks.2-3=1e-4; blocks.4=3e-4; head=1e-3"
    plan = plan_groups(net, lr=5e-2, lr_groups=spec)
    m = net.model
    rows = {r.name: r for r in plan.rows}
    assert list(rows) == ["conv_stem,bn1,blocks.0-1", "blocks.2-3", "blocks.4", "head"]
    assert rows["conv_stem,bn1,blocks.0-1"].frozen
    # conv_head and bn2 are not named: they join blocks.4, the module before them.
    assert rows["blocks.4"].modules == ["blocks.4", "conv_head", "bn2"]
    assert rows["blocks.4"].n_params == count(m.blocks[4]) + count(m.conv_head) + count(m.bn2)
    assert rows["blocks.2-3"].n_params == count(m.blocks[2]) + count(m.blocks[3])
    assert rows["head"].lr == 1e-3  # from the spec, not --lr
    opt = build_optimizer(net, plan)
    assert optimizer_summary(opt) == {
        "blocks.2-3": (rows["blocks.2-3"].n_params, 1e-4),
        "blocks.4": (rows["blocks.4"].n_params, 3e-4),
        "head": (rows["head"].n_params, 1e-3),
    }


def test_layers_after_the_cut_are_neither_listed_nor_trained():
    net = tiny_net(layer="blocks.3")
    plan = plan_groups(net, lr=1e-3, freeze="none")
    listed = {p for r in plan.rows for p in r.params}
    assert not any(p.startswith(("model.blocks.4", "model.conv_head", "model.bn2")) for p in listed)
    assert plan.rows[-2].name == "blocks.3"
    # The chained network really stops at the cut.
    assert [n for n, _ in net.chain][-1].startswith("blocks.3")


def test_several_cut_layers_run_through_the_cut_network_and_stop_there():
    backbone = open_backbone(MODEL, "none")
    net = TransferNet(backbone.model, ["blocks.2", "blocks.3"], "avg", None, 160)
    assert net.chain is None  # concatenated layers: the FX/hook cut network
    channels = [backbone.model.blocks[i][-1].conv_pwl.out_channels for i in (2, 3)]
    assert feature_dim(net, net.input_shape) == sum(channels)
    net.head = NNHead(head_config("linear"), sum(channels), 3)
    plan = plan_groups(net, lr=1e-3, freeze="none")
    listed = {p for r in plan.rows for p in r.params}
    assert any(p.startswith("model.blocks.3.") for p in listed)
    assert not any(p.startswith(("model.blocks.4.", "model.conv_head")) for p in listed)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"freeze": "all", "freeze_to": "blocks.2"}, "not both"),
        ({"freeze": "all", "layer_decay": 0.7}, "needs a trainable backbone"),
        ({"freeze": "some"}, "allowed: all, none"),
        ({"layer_decay": 1.5}, "must be in (0, 1]"),
        ({"freeze_to": "blocks.9"}, "unknown layer 'blocks.9'"),
        ({"freeze_to": "bn2"}, "freezes every layer up to the cut"),
        ({"lr_groups": "blocks.0=1e-3", "freeze": "none"}, "sets freezing and rates itself"),
        ({"lr_groups": "nosuch=1e-3"}, "unknown module 'nosuch'"),
        ({"lr_groups": "blocks.1=1e-3"}, "does not cover conv_stem"),
        ({"lr_groups": "blocks.0=1e-3;blocks.0=0"}, "is in two groups"),
        ({"lr_groups": "conv_stem,bn1,blocks=x"}, "is not a number"),
        ({"lr_groups": "conv_stem,bn1,blocks.3-1=0"}, "runs backwards"),
        ({"lr_groups": "conv_stem,bn1,blocks=-1"}, "must be 0 (frozen) or positive"),
    ],
)
def test_bad_group_settings_are_usage_errors(kw, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_groups(tiny_net(), lr=1e-3, **kw)


def test_freeze_to_must_come_before_the_cut():
    with pytest.raises(UsageError, match="not computed before the cut"):
        plan_groups(tiny_net(layer="blocks.2"), lr=1e-3, freeze_to="blocks.3")


# ----------------------------------------------------------------------------- training


def _backbone_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(model_dir / "backbone.safetensors"))


@pytest.mark.parametrize(
    "augment, cache, mode", [("none", "memory", "prefix"), ("light", "memory", "images")]
)
def test_frozen_tensors_stay_bit_identical_and_trainable_ones_change(
    split_folder, tmp_path, augment, cache, mode
):
    out = tmp_path / "m"
    res = fit(split_folder, out, freeze_to="blocks.2", augment=augment, cache=cache, epochs=2)
    assert res.mode == mode
    before = {k: v.numpy() for k, v in open_backbone(MODEL, "none").model.state_dict().items()}
    after = _backbone_tensors(out)
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.")
    trained = ("blocks.3.", "blocks.4.", "conv_head.", "bn2.")
    for k, v in before.items():
        if k.startswith(frozen):  # weights and BatchNorm statistics alike
            assert np.array_equal(after[k], v), k
    changed = [
        k for k in before if k.startswith(trained) and not np.array_equal(after[k], before[k])
    ]
    assert any(k.endswith("running_mean") for k in changed)  # BN below the head trains
    assert len(changed) > len([k for k in before if k.startswith(trained)]) // 2
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == {"trained": True, "file": "backbone.safetensors"}
    assert config["train"]["freeze_to"] == "blocks.2"


def test_bn_train_lets_frozen_statistics_move(split_folder, tmp_path):
    out = tmp_path / "m"
    res = fit(split_folder, out, freeze_to="blocks.2", bn="train", augment="none", epochs=1)
    assert res.mode == "images"  # statistics change, so nothing can be cached
    before = open_backbone(MODEL, "none").model.state_dict()
    after = _backbone_tensors(out)
    assert not np.array_equal(after["bn1.running_mean"], before["bn1.running_mean"].numpy())
    assert np.array_equal(after["conv_stem.weight"], before["conv_stem.weight"].numpy())


def test_frozen_backbone_trains_on_cached_features_and_is_referenced_not_copied(
    split_folder, tmp_path, runner
):
    out = tmp_path / "m"
    result = runner.invoke(
        app,
        [
            "fit",
            str(split_folder),
            "--head",
            "mlp",
            "--hidden",
            "16,8",
            "--head-bn",
            "-o",
            str(out),
            "--epochs",
            "2",
            "--json",
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["mode"] == "features"
    assert [g["frozen"] for g in info["groups"]] == [True, False]  # backbone, head
    assert not (out / "backbone.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == {"type": "mlp", "hidden": [16, 8], "dropout": 0.5, "batchnorm": True}
    assert config["backbone"]["trained"] is False
    assert config["cut"]["weights_sha256"]
    header = (out / "history.csv").read_text().splitlines()[0]
    assert header.split(",")[:6] == [
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
    ]
    saved = load_model(out)
    assert saved.backbone is None and "layers.0.weight" in saved.tensors


def test_prefix_cache_trains_like_the_uncached_network(split_folder, tmp_path):
    kw = dict(freeze_to="blocks.3", augment="none", epochs=2)
    cached = fit(split_folder, tmp_path / "a", cache="memory", **kw)
    disk = fit(split_folder, tmp_path / "b", cache="disk", cache_dir=str(tmp_path / "c"), **kw)
    plain = fit(split_folder, tmp_path / "d", cache="off", **kw)
    assert (cached.mode, disk.mode, plain.mode) == ("prefix", "prefix", "images")
    for a, b in zip(cached.history, plain.history, strict=True):
        # fp16 cached maps: the same training up to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-2)
    assert [h["train_loss"] for h in disk.history] == [h["train_loss"] for h in cached.history]
    assert not list((tmp_path / "c").iterdir())  # the disk cache is removed afterwards


def test_frozen_prefix_maps_are_cached_on_disk_across_runs(split_folder, tmp_path, monkeypatch):
    """A second run with another learning rate reads the frozen prefix's maps from the
    feature cache instead of running the prefix again, and trains the same way."""
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(freeze_to="blocks.3", augment="flip", epochs=2)
    first = fit(split_folder, tmp_path / "a", lr=1e-3, **kw)
    second = fit(split_folder, tmp_path / "b", lr=1e-3, **kw)
    third = fit(split_folder, tmp_path / "c", lr=3e-3, **kw)
    assert first.mode == second.mode == "prefix"
    n = len(list((split_folder / "train").rglob("*.*"))) + len(
        list((split_folder / "val").rglob("*.*"))
    )
    assert first.prefix_maps == {"cached": 0, "computed": n}
    assert second.prefix_maps == third.prefix_maps == {"cached": n, "computed": 0}
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in first.history]
    assert third.history[-1]["lr"] != first.history[-1]["lr"]


class _Stop(Exception):
    pass


def test_freeze_epochs_train_the_head_alone_first(split_folder, tmp_path):
    out = tmp_path / "m"
    initial = {
        k: v.numpy().copy() for k, v in open_backbone(MODEL, "none").model.state_dict().items()
    }
    seen = {}

    def events(name, data):
        if name == "epoch_end":  # the checkpoint of that epoch is written by then
            seen[data["epoch"]] = load_file(str(out / ckpt.CHECKPOINT_DIR / ckpt.WEIGHTS))

    fit(split_folder, out, freeze="none", freeze_epochs=1, epochs=2, augment="none", events=events)
    backbone_keys = [k for k in seen[1] if k.startswith("model.")]
    assert "model.conv_stem.weight" in backbone_keys
    unchanged = lambda w, k: np.array_equal(w[k], initial[k[len("model.") :]])  # noqa: E731
    assert all(unchanged(seen[1], k) for k in backbone_keys)  # epoch 1: the head alone
    assert not unchanged(seen[2], "model.conv_stem.weight")  # epoch 2: everything
    assert not np.array_equal(seen[1]["head.layers.1.weight"], seen[2]["head.layers.1.weight"])


def test_early_stopping_keeps_the_best_epoch(split_folder, tmp_path):
    out = tmp_path / "m"
    res = fit(split_folder, out, lr=1e-12, epochs=5, patience=1, augment="none")
    assert res.stopped_early and len(res.history) == 2
    assert res.best_epoch == 1
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["best_epoch"] == 1 and config["train"]["stopped_early"] is True


# ----------------------------------------------------------------------------- resume


def test_interrupt_and_resume_give_the_same_weights_as_an_uninterrupted_run(split_folder, tmp_path):
    # Random crops, flips and dropout, AdamW state and the schedule must all carry over.
    kw = dict(
        head="mlp",
        hidden="16",
        freeze_to="blocks.2",
        augment="light",
        epochs=2,
        cache="off",
        class_weight="balanced",
    )
    full = tmp_path / "full"
    fit(split_folder, full, **kw)

    cut = tmp_path / "cut"

    def interrupt(name, data):
        if name == "epoch_start" and data["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(split_folder, cut, events=interrupt, **kw)
    state = ckpt.read_state(cut)
    assert state["epoch"] == 1 and state["settings"]["options"]["freeze_to"] == "blocks.2"
    # Frozen parameters have no optimiser state; every trainable one has.
    opt_state = load_file(str(cut / ckpt.CHECKPOINT_DIR / ckpt.OPTIMIZER))
    n_with_state = len({k.split(".")[1] for k in opt_state})
    n_trainable = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_with_state == n_trainable
    with pytest.raises(ArtifactError, match="unfinished training run"):
        load_model(cut)

    resume_nn(cut, split_folder, run=RUN)
    for name in ("head.safetensors", "backbone.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    learned = lambda d: [r.split(",")[:6] for r in (d / "history.csv").read_text().splitlines()]  # noqa: E731
    assert learned(cut) == learned(full) and len(learned(cut)) == 1 + 2  # all but timings
    assert not (cut / ckpt.CHECKPOINT_DIR).exists()


def test_cli_interrupt_then_resume(split_folder, tmp_path, runner, monkeypatch):
    out = tmp_path / "m"
    real = Trainer.train_epoch

    def ctrl_c_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_epoch_2)
    args = ["--head", "linear", "--epochs", "2", "--augment", "none", "-o", str(out), *TINY]
    stopped = runner.invoke(app, ["fit", str(split_folder), *args])
    assert stopped.exit_code == 130
    assert f"epoch 1 is saved in {out}; continue with: tlearn fit" in stopped.output
    monkeypatch.setattr(Trainer, "train_epoch", real)
    base = ["fit", str(split_folder), "-q"]
    changed = runner.invoke(app, [*base, "--resume", str(out), "--lr", "0.5"])
    assert changed.exit_code == 2
    assert "--lr 0.5 differs from the checkpoint's default" in changed.output
    again = runner.invoke(app, [*base, "--head", "linear", "-o", str(out), *TINY])
    assert again.exit_code == 1 and "--resume" in again.output
    predict = runner.invoke(app, ["predict", str(out), str(split_folder / "val")])
    assert predict.exit_code == 1 and "unfinished training run" in predict.output
    ok = runner.invoke(app, [*base, "--resume", str(out), "--epochs", "2"])
    assert ok.exit_code == 0, ok.output
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 2  # epochs 1 and 2
    nothing = runner.invoke(app, [*base, "--resume", str(out)])
    assert nothing.exit_code == 1 and "no training checkpoint" in nothing.output


# ----------------------------------------------------------------------------- CLI


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 5 and cells[0].isdigit():
            rows.append(cells)
    return rows


@pytest.mark.parametrize(
    "args",
    [
        ["--layer-decay", "0.7"],
        ["--lr-groups", "conv_stem,bn1,blocks.0-1=0;blocks.2-3=1e-4;blocks.4=3e-4;head=1e-3"],
    ],
)
def test_printed_group_table_matches_the_optimizer(
    split_folder, tmp_path, runner, monkeypatch, args
):
    made = []
    real = Trainer.train_epoch

    def spy(self, epoch):  # the optimiser the run trains with
        made.append(self.setup.optimizer)
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    out = tmp_path / "m"
    result = runner.invoke(
        app,
        [
            "fit",
            str(split_folder),
            "--head",
            "linear",
            "-o",
            str(out),
            "--epochs",
            "1",
            "--augment",
            "none",
            *args,
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    assert rows and rows[-1][1] == "head"
    actual = optimizer_summary(made[0])
    trainable = [r for r in rows if r[4] == "yes"]
    assert len(trainable) == len(actual)
    for (_, _, params, lr, _), (n, base_lr) in zip(trainable, actual.values(), strict=True):
        assert int(params.replace(",", "")) == n
        assert float(lr) == pytest.approx(base_lr, rel=1e-2)
    if args[0] == "--layer-decay":
        # --layer-decay alone fine-tunes above the stage before the last (blocks.3 here)
        assert [float(r[3]) for r in trainable] == pytest.approx([0.0007, 0.001])
        assert rows[0][1] == "conv_stem, bn1, blocks.0-3" and rows[0][3] == "frozen"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--epochs", "3"], 2, "--epochs applies to neural heads only"),
        (["--head", "linear", "--hidden", "64"], 2, "--hidden applies to --head mlp only"),
        (["--head", "mlp", "--hidden", "0"], 2, "give one or more positive sizes"),
        (["--head", "linear", "--freeze-epochs", "3", "--epochs", "3"], 2, "below --epochs"),
        (["--head", "linear", "--freeze", "all", "--freeze-epochs", "1"], 2, "drop one"),
        (["--head", "linear", "--freeze-to", "blocks.9"], 2, "unknown layer 'blocks.9'"),
        (["--head", "linear", "--C", "1"], 2, "--C applies to --head svm|logreg"),
    ],
)
def test_cli_option_errors(split_folder, tmp_path, runner, args, code, message):
    result = runner.invoke(app, ["fit", str(split_folder), "-o", str(tmp_path / "m"), *args, *TINY])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_output_is_a_usage_error(split_folder, runner):
    result = runner.invoke(app, ["fit", str(split_folder), "--head", "linear", *TINY])
    assert result.exit_code == 2 and "missing -o/--output" in result.output


# ----------------------------------------------------------------------------- predict / TTA


@pytest.fixture(scope="module")
def nn_model(tmp_path_factory, split_folder) -> Path:
    out = tmp_path_factory.mktemp("nn") / "nn"
    fit(split_folder, out, freeze_to="blocks.3", epochs=1, augment="none")
    return out


def test_predict_and_evaluate_nn_models(nn_model, split_folder, runner):
    val = str(split_folder / "val")
    for tta in ("none", "10crop"):
        result = runner.invoke(app, ["predict", str(nn_model), val, "--all-scores", "--tta", tta])
        assert result.exit_code == 0, result.output
        lines = result.stdout.strip().splitlines()
        assert lines[0].startswith("path,prediction,score,probability,score_asphalt")
        assert len(lines) == 1 + N_VAL
        for line in lines[1:]:
            probs = [float(v) for v in line.split(",")[-3:]]
            assert sum(probs) == pytest.approx(1, abs=1e-4)  # softmax probabilities
    ev = runner.invoke(app, ["evaluate", str(nn_model), val, "--json", "--tta", "flip"])
    assert ev.exit_code == 0, ev.output
    m = json.loads(ev.stdout)
    assert m["n_images"] == N_VAL and m["tta"] == "flip" and 0 <= m["accuracy"] <= 1


def _mirror_copies(folder: Path, dest: Path) -> tuple[list[Path], list[Path]]:
    originals = sorted(folder.rglob("*.png"))[:4]
    mirrored = []
    for p in originals:
        q = dest / p.name
        q.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(p)).save(q)
        mirrored.append(q)
    return originals, mirrored


@pytest.mark.parametrize("kind", ["svm", "nn"])
def test_flip_tta_averages_the_scores_of_the_image_and_its_mirror(
    kind, fitted_model, nn_model, split_folder, tmp_path
):
    from tlearn.jobs.torch_scores import score_images

    saved = load_model(fitted_model if kind == "svm" else nn_model)
    originals, mirrored = _mirror_copies(split_folder / "val", tmp_path / "mirror")
    plain = score_images(saved, [str(p) for p in originals], workers=0).scores
    mirror = score_images(saved, [str(p) for p in mirrored], workers=0).scores
    tta = score_images(saved, [str(p) for p in originals], tta="flip", workers=0).scores
    np.testing.assert_allclose(tta, (plain + mirror) / 2, rtol=1e-3, atol=1e-4)


def test_ten_crop_views_are_corners_centre_and_their_mirrors():
    from tlearn.runtime.augment import tta_transform
    from tlearn.runtime.transforms import eval_transform

    cfg = {
        "input_size": [3, 32, 32],
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 0.8,
        "crop_mode": "center",
    }
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    v = tta_transform(cfg, "10crop")(img)
    assert v.shape == (10, 3, 32, 32)
    # mirror of the flipped image's corners: tl<->tr, bl<->br swap places; the centre stays
    for i, j in ((5, 1), (6, 0), (7, 3), (8, 2), (9, 4)):
        assert torch.allclose(v[i], v[j].flip(-1)), (i, j)
    assert torch.allclose(v[4], eval_transform(cfg)(img), atol=1e-5)
    f = tta_transform(cfg, "flip")(img)
    assert torch.equal(f[1], f[0].flip(-1))


def test_tta_needs_images_not_features_csv(fitted_model, image_folder, tmp_path, runner):
    csv = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(csv), "-q", *TINY])
    assert r.exit_code == 0, r.output
    result = runner.invoke(app, ["evaluate", str(fitted_model), str(csv), "--tta", "flip"])
    assert result.exit_code == 2 and "needs images" in result.output
    nn_fit = runner.invoke(app, ["fit", str(csv), "--head", "linear", "-o", str(tmp_path / "m")])
    assert nn_fit.exit_code == 2 and "neural heads train from images" in nn_fit.output


# ----------------------------------------------------------------------------- validation


def _tamper_head(d: Path):
    t = load_file(str(d / "head.safetensors"))
    t["layers.1.weight"] = t["layers.1.weight"][:, :-1]
    save_file(t, str(d / "head.safetensors"))


def _tamper_backbone(d: Path):
    t = load_file(str(d / "backbone.safetensors"))
    t["conv_stem.weight"] = t["conv_stem.weight"][:-1]
    save_file(t, str(d / "backbone.safetensors"))


def _drop_backbone(d: Path):
    (d / "backbone.safetensors").unlink()


def _extra_head_tensor(d: Path):
    t = load_file(str(d / "head.safetensors"))
    t["layers.9.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(d / "head.safetensors"))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_tamper_head, "tensor layers.1.weight has shape"),
        (_extra_head_tensor, "unexpected: ['layers.9.weight']"),
        (_tamper_backbone, "tensor conv_stem.weight has shape"),
        (_drop_backbone, "has no backbone.safetensors"),
    ],
)
def test_load_model_refuses_tampered_nn_models(nn_model, tmp_path, tamper, message):
    d = tmp_path / "copy"
    shutil.copytree(nn_model, d)
    tamper(d)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_model(d)


@pytest.mark.parametrize(
    "state, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a tlearn checkpoint"),
        ('{"format": "tlearn-checkpoint", "format_version": 9}', "format_version 9"),
        ('{"format": "tlearn-checkpoint", "format_version": 1}', "incomplete or unknown"),
    ],
)
def test_resume_refuses_a_broken_checkpoint(tmp_path, state, message):
    (tmp_path / "m" / ckpt.CHECKPOINT_DIR).mkdir(parents=True)
    (tmp_path / "m" / ckpt.CHECKPOINT_DIR / ckpt.STATE).write_text(state)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        resume_nn(tmp_path / "m")


def test_terminal_progress_shows_one_bar_per_epoch_with_live_numbers():
    import io

    from rich.console import Console

    from tlearn.cli.train import TrainView

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with TrainView(console, quiet=False) as view:
        view.progress_cb("cache train", 4, 8)
        for epoch in (1, 2):
            view.event("epoch_start", {"epoch": epoch, "epochs": 2, "total": 8})
            view.event(
                "batch",
                {
                    "epoch": epoch,
                    "done": 8,
                    "total": 8,
                    "loss": 0.5,
                    "acc": 0.75,
                    "images_per_s": 40.0,
                },
            )
            view.event(
                "epoch_end",
                {
                    "epoch": epoch,
                    "train_loss": 0.5,
                    "train_acc": 0.75,
                    "val_loss": 0.4,
                    "val_acc": 0.8,
                    "seconds": 1.0,
                    "images_per_s": 40.0,
                    "best": True,
                },
            )
    text = buf.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "cache train" in text
    assert "val loss 0.400 acc 0.800 *" in text and "40 img/s" in text
    quiet = io.StringIO()
    with TrainView(Console(file=quiet, force_terminal=True), quiet=True) as view:
        view.event("epoch_start", {"epoch": 1, "epochs": 1, "total": 8})
    assert quiet.getvalue() == ""


def test_neural_fit_works_when_typer_hands_over_plain_strings(
    split_folder, tmp_path, runner, monkeypatch
):
    """Older typer/click releases give choice options to the command as plain strings, not
    enums (seen on a machine with them: every neural fit failed with "'str' object has no
    attribute 'value'"). The command must work from either."""
    from enum import Enum

    import tlearn.cli.fit as cli_fit

    original = cli_fit.fit_nn_command
    seen = []

    def as_older_typer(ctx, params, err, out):
        plain = {k: v.value if isinstance(v, Enum) else v for k, v in params.items()}
        seen.extend(k for k, v in params.items() if isinstance(v, Enum))
        return original(ctx, plain, err, out)

    monkeypatch.setattr(cli_fit, "fit_nn_command", as_older_typer)
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "--head", "linear", "-o", str(out), "--epochs", "1"]
    result = runner.invoke(app, [*args, "--optimizer", "sgd", "--pool", "max", *TINY])
    assert result.exit_code == 0, result.output
    assert {"head", "pool", "optimizer", "bn", "cache"} <= set(seen)  # were enums, now str
    config = json.loads((out / "config.json").read_text())
    assert config["head"]["type"] == "linear"
    assert config["cut"]["pool"] == "max"
