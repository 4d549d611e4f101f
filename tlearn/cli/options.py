"""Options shared by several commands (typer Annotated types and their choices), and
the RunOptions they make."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from tlearn.core.options import RunOptions

# ----------------------------------------------------------------------------- options

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="timm architecture name (see `tlearn models`).")
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        help="auto (bundled offline package, else timm's pretrained weights), none (random "
        "init), or a .safetensors/.pth file.",
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        "-l",
        help="Where to cut: a name from `tlearn layers MODEL` (e.g. blocks.4), a feature stage "
        "index like -1, or several joined by commas. Default: the final pooled features. "
        "fit also takes auto: sweep the layers on the training data (CV of a linear SVM) "
        "and cut at the best, for any head (a neural head is then trained there).",
    ),
]


class Pool(str, Enum):
    avg = "avg"
    max = "max"
    avgmax = "avgmax"
    catavgmax = "catavgmax"
    flatten = "flatten"


class Head(str, Enum):
    svm = "svm"
    logreg = "logreg"
    linear = "linear"
    mlp = "mlp"


class Format(str, Enum):
    table = "table"
    csv = "csv"
    tsv = "tsv"
    json = "json"
    jsonl = "jsonl"


PoolOpt = Annotated[
    Pool, typer.Option("--pool", help="How to turn the cut feature map into a vector.")
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=0, help="Decoding processes (default: auto).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Fail (exit 3) if any image cannot be read; nothing is written."),
]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="CSV with header path,label instead of folders.")
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Do only shard I of N (0-based) and write OUTPUT.part-I-of-N (5 digits each); "
        "join the parts with `tlearn merge`. Under torchrun the ranks shard and merge by "
        "themselves.",
    ),
]


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


BackendOpt = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="Inference backend: auto (ONNX Runtime on CPU, torch on GPU), torch or onnx.",
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Neither read nor write the feature cache (see `tlearn cache info`).",
    ),
]


class Decode(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


MultiLabelOpt = Annotated[
    bool,
    typer.Option(
        "--multi-label",
        help="Each image has a set of labels: --labels FILE with labels joined by ';' "
        "(empty = none); one-vs-rest heads with per-label thresholds, scored by mAP.",
    ),
]

DecodeOpt = Annotated[
    Decode,
    typer.Option(
        "--decode",
        help="Where JPEGs are decoded: auto (gpu on CUDA with the torch backend, else cpu), "
        "cpu (worker processes) or gpu (nvJPEG; other files take the CPU path).",
    ),
]


def run_options(
    batch_size,
    device,
    workers,
    quiet,
    progress=None,
    backend=Backend.auto,
    no_cache=False,
    decode=Decode.auto,
):

    return RunOptions(
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        backend=Backend(backend).value,
        cache=not no_cache,
        decode=Decode(decode).value,
    )


class TTA(str, Enum):
    none = "none"
    flip = "flip"
    tencrop = "10crop"


TTAOpt = Annotated[
    TTA | None,
    typer.Option(
        "--tta",
        help="Test-time augmentation: none, flip, or 10crop (four corners + "
        "centre and their mirrors); scores are averaged. Default: what the model chose "
        "on its validation images (fit --choose-tta, --preset best), else none.",
    ),
]
