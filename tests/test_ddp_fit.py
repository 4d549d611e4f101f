"""`tlearn fit --head linear` under torchrun (DistributedDataParallel, 2 CPU processes on
gloo) must train what one process trains with the same global --batch-size and seed.

Exact comparisons need a network whose training step does not depend on how a batch is
split: test_convnext normalises with LayerNorm (per image, no BatchNorm batch
statistics), dropout is 0 and augmentation none. Float sums still run in another order
(gradients are summed over ranks), so tensors are compared with a tolerance; frozen
tensors must be bit-identical. 15 training images in global batches of 4: the last batch
(3 images) splits unevenly over the two ranks. One torchrun launch runs every command
(launches are slow): see RUN_CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import make_dataset
from tests.test_shard import REPO, torch_threads
from tlearn.backbone.weights import open_backbone
from tlearn.cli.app import app
from tlearn.core.options import RunOptions
from tlearn.core.system import DistEnv
from tlearn.train import checkpoint as ckpt
from tlearn.train.api import fit_nn, resume_nn
from tlearn.train.dist import Dist
from tlearn.train.options import TrainOptions

MODEL = "test_convnext"
COMMON = ["--head", "linear", "-m", MODEL, "--weights", "none", "--batch-size", "4"]
COMMON += ["--workers", "0", "--dropout", "0", "--augment", "none", "--epochs", "3", "-q"]
# Frozen stem and stage 0-1 (their outputs cached), stages 2-3 with layer-wise decay; the
# first epoch trains the head alone (DDP is rebuilt when stages 2-3 start to train).
MAIN = ["--freeze-to", "stages.1", "--layer-decay", "0.7", "--freeze-epochs", "1"]
MAIN += ["--class-weight", "balanced"]
# Every layer runs every epoch, explicit rates, an unreadable training image.
IMAGES = ["--lr-groups", "stem,stages.0-1=0; stages.2=1e-4; stages.3=3e-4; head=1e-3"]
IMAGES += ["--cache", "off"]
# BatchNorm that trains (per-rank batch statistics: runs, but is not exactly one process)
BATCHNORM = ["-m", "test_efficientnet", "--head", "mlp", "--hidden", "8", "--head-bn"]
BATCHNORM += ["--freeze-to", "blocks.2", "--epochs", "1"]
OPTIONS = dict(head="linear", dropout=0.0, augment="none", epochs=3)
MAIN_OPTS = dict(freeze_to="stages.1", layer_decay=0.7, freeze_epochs=1, class_weight="balanced")
IMAGES_OPTS = dict(lr_groups=IMAGES[1], cache="off")
RUN = RunOptions(batch_size=4, workers=0)

RUN_CLI = """
import json, os, shutil, sys
from tlearn.cli.app import app
from tlearn.train.loop import Trainer

real = Trainer.train_epoch

def stop_before_epoch_2(self, epoch):  # on every rank, after epoch 1's checkpoint
    if epoch == 1:
        raise KeyboardInterrupt
    return real(self, epoch)

codes = []
for kind, args in json.loads(sys.argv[1]):
    if kind == "copy":  # keep a checkpoint as it was (rank 0; the others wait for nothing)
        if os.environ["RANK"] == "0":
            shutil.copytree(*args)
        continue
    Trainer.train_epoch = stop_before_epoch_2 if kind == "interrupt" else real
    codes.append(app(args, standalone_mode=False, prog_name="tlearn"))
with open(f"codes-{os.environ['RANK']}.json", "w") as f:
    json.dump(codes, f)
from tlearn.scale.group import exit_rank  # as tlearn.cli.main ends a torchrun rank
exit_rank(0)
"""


def _single(data, out, events=None, **kw):
    with torch_threads(1):  # as each rank runs (TLEARN_NUM_THREADS=1)
        return fit_nn(
            data,
            out,
            options=TrainOptions(**OPTIONS, **kw),
            model=MODEL,
            weights="none",
            run=RUN,
            events=events,
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    make_dataset(data / "train", n=5, seed=1)
    make_dataset(data / "val", n=3, seed=2)
    bad = base / "bad"
    shutil.copytree(data, bad)
    (bad / "train" / "grass" / "zz_bad.jpg").write_bytes(b"not an image")

    t0 = time.perf_counter()
    _single(data, base / "single", **MAIN_OPTS)
    _single(bad, base / "single_images", **IMAGES_OPTS)
    cut = base / "cut_single"

    def interrupt(name, info):
        if name == "epoch_start" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _single(data, cut, events=interrupt, **MAIN_OPTS)
    shutil.copytree(cut / ckpt.CHECKPOINT_DIR, base / "ckpt_single")
    single_s = time.perf_counter() - t0

    d, o = str(data), ["-o"]
    commands = [
        ["fit", ["fit", d, *COMMON, *MAIN, *o, "ddp"]],
        ["fit", ["fit", str(bad), *COMMON, *IMAGES, *o, "ddp_images"]],
        ["interrupt", ["fit", d, *COMMON, *MAIN, *o, "ddp_cut"]],
        ["copy", ["ddp_cut/checkpoint", "ckpt_ddp"]],
        ["fit", ["fit", d, "--resume", "ddp_cut", "-q"]],
        ["fit", ["fit", d, "--resume", str(cut), "-q"]],
        ["fit", ["fit", d, *COMMON, "--batch-size", "5", *o, "odd"]],
        ["fit", ["fit", d, *COMMON, *BATCHNORM, *o, "ddp_bn"]],
    ]
    (base / "run_cli.py").write_text(RUN_CLI)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", TLEARN_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        + ["2", "run_cli.py", json.dumps(commands)],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"single-process runs {single_s:.1f}s, torchrun launch {time.perf_counter() - t0:.1f}s")
    assert r.returncode == 0, r.stderr[-4000:]
    codes = [json.loads((base / f"codes-{rank}.json").read_text()) for rank in (0, 1)]
    return {"base": base, "data": data, "stderr": r.stderr, "codes": codes}


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out = {f"head.{k}": v for k, v in load_file(str(model_dir / "head.safetensors")).items()}
    backbone = model_dir / "backbone.safetensors"
    if backbone.exists():
        out.update({f"model.{k}": v for k, v in load_file(str(backbone)).items()})
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=1e-5, err_msg=k)
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"] for d in (a, b))
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    for x, y in zip(ha, hb, strict=True):
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["epoch"], key)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca["train"]["best_epoch"] == cb["train"]["best_epoch"]
    assert ca["train"]["groups"] == cb["train"]["groups"]


def test_two_processes_train_what_one_process_trains(runs):
    base = runs["base"]
    assert runs["codes"][0][:2] == [None, None] and runs["codes"][1][:2] == [None, None]
    _assert_same_training(base / "single", base / "ddp")
    # The frozen stem is bit-identical to the initial weights; stage 2 trained.
    initial = {k: v.numpy() for k, v in open_backbone(MODEL, "none").model.state_dict().items()}
    trained = load_file(str(base / "ddp" / "backbone.safetensors"))
    for k in ("stem.0.weight", "stages.1.blocks.0.conv_dw.weight"):
        assert np.array_equal(trained[k], initial[k]), k
    k = "stages.2.blocks.0.conv_dw.weight"
    assert not np.array_equal(trained[k], initial[k])
    # Same files as one process writes, written once: no part or temporary files anywhere.
    assert sorted(p.name for p in (base / "ddp").iterdir()) == sorted(
        p.name for p in (base / "single").iterdir()
    )
    stray = [p for p in base.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert stray == []
    assert runs["stderr"].count("1 image(s) skipped") == 1  # only rank 0 reports


def test_every_layer_every_epoch_with_an_unreadable_image(runs):
    """--cache off: each rank decodes its slice of each batch; the unreadable image leaves
    one rank a slice shorter, and the loss still averages over the global batch."""
    _assert_same_training(runs["base"] / "single_images", runs["base"] / "ddp_images")


def test_checkpoints_and_resume_under_torchrun(runs):
    base = runs["base"]
    for rank in (0, 1):
        assert runs["codes"][rank][2:5] == [130, None, None]
    # The checkpoint torchrun writes has the single-process format and content.
    a, b = base / "ckpt_single", base / "ckpt_ddp"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    sa, sb = (json.loads((d / ckpt.STATE).read_text()) for d in (a, b))
    assert sa.keys() == sb.keys() and (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"]) == (
        1,
        4,
    )
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for name in (ckpt.WEIGHTS, ckpt.OPTIMIZER):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        assert all(np.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa), name
    # Resumed under torchrun (from its own checkpoint, and from one written by a single
    # process): the same as the uninterrupted single-process run.
    _assert_same_training(base / "single", base / "ddp_cut")
    _assert_same_training(base / "single", base / "cut_single")
    assert not (base / "ddp_cut" / ckpt.CHECKPOINT_DIR).exists()


def test_trainable_batchnorm_runs_with_a_one_image_slice(runs):
    """The last global batch (3 images) leaves rank 1 one image: BatchNorm in train mode
    needs two rows, so the slice is padded with a row the loss ignores; the ranks'
    running statistics are averaged."""
    assert [c[-1] for c in runs["codes"]] == [None, None]
    config = json.loads((runs["base"] / "ddp_bn" / "config.json").read_text())
    assert config["head"]["batchnorm"] is True and config["backbone"]["trained"] is True
    head = load_file(str(runs["base"] / "ddp_bn" / "head.safetensors"))
    assert not np.allclose(head["layers.1.running_mean"], 0)


def test_a_batch_that_does_not_split_fails_every_rank_with_one_line(runs):
    assert [c[-2] for c in runs["codes"]] == [2, 2]
    err = runs["stderr"]
    message = "--batch-size 5 is the global batch, split evenly over the 2 processes"
    lines = [line for line in err.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    assert "multiple of 2 (e.g. 4 or 6)" in lines[0]
    assert "Traceback" not in err
    assert not (runs["base"] / "odd").exists()


def test_svm_and_logreg_heads_refuse_torchrun(runner, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    for head in ("svm", "logreg"):
        r = runner.invoke(app, ["fit", str(tmp_path), "--head", head, "-o", "m"], env=env)
        assert r.exit_code == 2, r.output
        assert f"tlearn fit --head {head} does not run under torchrun" in r.stderr
        assert "tlearn extract" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 7, 8])
def test_each_global_batch_is_cut_into_contiguous_rank_slices(size):
    rows = list(range(100, 100 + size))
    for world in (2, 3, 4):
        slices = [list(Dist(DistEnv(r, world, r, world), None).mine(rows)) for r in range(world)]
        assert sum(slices, []) == rows
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_resume_in_one_process_is_unchanged(runs, tmp_path):
    """A checkpoint written under torchrun resumes in one process too."""
    cut = tmp_path / "m"
    shutil.copytree(runs["base"] / "ckpt_ddp", cut / ckpt.CHECKPOINT_DIR)
    with torch_threads(1):
        resume_nn(cut, runs["data"], run=RUN)
    _assert_same_training(runs["base"] / "single", cut)


CRASH = """
import os, sys
from tlearn.cli import main
from tlearn.train.ddp import DistStepper

real = DistStepper.run

def boom(self, batches, epoch, t0):  # rank 1 alone fails in the middle of training
    if epoch == 1 and os.environ["RANK"] == "1":
        raise RuntimeError("simulated failure")
    return real(self, batches, epoch, t0)

DistStepper.run = boom
sys.argv = ["tlearn", *sys.argv[1:]]
main()
"""


def test_an_error_on_one_rank_stops_every_rank_and_names_the_rank(runs, tmp_path):
    """No status exchange can report it (the other rank waits in a collective): the failing
    rank prints its one line, torchrun stops the others, the last checkpoint stays."""
    (tmp_path / "crash.py").write_text(CRASH)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", TLEARN_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["fit", str(runs["data"]), *COMMON, "--epochs", "2", "-o", "m"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        + ["2", "crash.py", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode != 0
    line = "error (rank 1): unexpected RuntimeError: simulated failure"
    assert r.stderr.count(line) == 1, r.stderr[-3000:]
    assert ckpt.read_state(tmp_path / "m")["epoch"] == 1
    assert not (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize(
    "local, gpus, device, refused",
    [
        (2, 1, "cuda:0", True),  # two ranks would share the GPU: NCCL refuses, unhelpfully
        (4, 2, "cuda:1", True),
        (2, 2, "cuda:1", False),
        (1, 1, "cuda:0", False),
        (2, 0, "cpu", False),  # gloo on the CPU: any number of processes
        (2, 1, "auto", False),  # no GPU found: ProcessGroup leaves "auto"
    ],
)
def test_training_on_gpus_needs_one_gpu_per_process(local, gpus, device, refused):
    from tlearn.core.errors import UsageError
    from tlearn.train.dist import check_one_gpu_per_process

    env = DistEnv(rank=0, world_size=local, local_rank=0, local_world_size=local)
    if not refused:
        check_one_gpu_per_process(env, device, gpus=gpus)
        return
    with pytest.raises(UsageError) as e:
        check_one_gpu_per_process(env, device, gpus=gpus)
    msg = str(e.value)
    assert f"started {local} processes" in msg and f"--nproc-per-node {gpus}" in msg
    assert "--device cpu" in msg
