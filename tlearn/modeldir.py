"""The model directory: config.json + head.safetensors + metrics.json.

Nothing is pickled. Loading validates the config against the format version and every
tensor's name and shape, so a truncated or edited directory is refused with a clear
message instead of producing wrong predictions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from tlearn.core.atomic import atomic_dir, read_json, recover_dir, write_json
from tlearn.core.checks import (
    MAX_FEATURE_DIM,
    MAX_HIDDEN,
    check_cut,
    check_data_config,
    is_int,
    is_number,
    need,
    shown,
)
from tlearn.core.errors import ArtifactError
from tlearn.core.spec import NN_HEADS, CutSpec
from tlearn.core.system import versions
from tlearn.core.version import __version__
from tlearn.heads.linear import LinearHead
from tlearn.heads.neural import expected_shapes as neural_shapes
from tlearn.heads.posthoc import CALIBRATION_FILE, TASKS, PostHoc

FORMAT = "tlearn-model"
FORMAT_VERSION = 1
CONFIG = "config.json"
HEAD_FILE = "head.safetensors"
METRICS = "metrics.json"
REQUIRED_KEYS = ("format", "format_version", "head", "cut", "data_config", "classes", "feature_dim")
HEAD_FAMILIES = {"svm": "linear", "logreg": "linear", "linear": "nn", "mlp": "nn"}
BACKBONE_FILE = "backbone.safetensors"  # nn heads whose backbone was (partly) trained
MAX_WEIGHT = 1e6  # no trained head comes near this; a file beyond it is damaged or hostile
# svm/logreg: a scale is a feature's standard deviation (StandardScaler makes 0 into 1);
# an intercept of -1e9 marks a class absent from training (heads.linear).
LINEAR_BOUNDS = {"scaler_scale": (1e-12, MAX_WEIGHT), "intercept": (-1e9, MAX_WEIGHT)}


@dataclass
class SavedModel:
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]
    backbone: dict[str, np.ndarray] | None = None  # fine-tuned backbone weights, if any
    posthoc: PostHoc | None = None  # calibration, sets, "unknown" (None: an older model)

    @property
    def task(self) -> str:
        """ "multi-class" (one class per image) or "multi-label" (a set of labels)."""
        return self.config.get("task", "multi-class")

    @property
    def tta(self) -> str:
        """The test-time augmentation fit chose on validation images (--choose-tta), which
        predict and evaluate use when --tta is not given; "none" without a choice."""
        return (self.config.get("tta") or {}).get("chosen", "none")

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def cut(self) -> CutSpec:
        return CutSpec.from_dict(self.config["cut"])

    @property
    def data_config(self) -> dict:
        return self.config["data_config"]

    @property
    def head_type(self) -> str:
        return self.config["head"]["type"]

    @property
    def is_nn(self) -> bool:
        """A trained neural head (predict runs the network), not an svm/logreg head."""
        return self.head_type in NN_HEADS


def build_config(
    *, cut: CutSpec, data_config: dict, classes: list[str], head: dict, feature_dim: int, **extra
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "head": head,
        "cut": cut.to_dict(),
        "data_config": data_config,
        "classes": list(classes),
        "feature_dim": int(feature_dim),
        "versions": versions(),
        **extra,
    }


def save_model(
    out_dir: str | Path,
    config: dict,
    tensors: dict[str, np.ndarray],
    metrics: dict | None = None,
    force: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the whole directory under a temporary name, then move it into place."""

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        # reshape: ascontiguousarray turns 0-d arrays (e.g. num_batches_tracked) into 1-d.
        arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
        # save() + write_bytes, not save_file: that one makes 0600 files whatever the umask
        (tmp / HEAD_FILE).write_bytes(save(arrays))
        write_json(tmp / CONFIG, config)
        if metrics is not None:
            write_json(tmp / METRICS, metrics)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def posthoc_bytes(posthoc: PostHoc) -> bytes:
    """calibration.safetensors of a model's post-hoc parts (save_model's extra file)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in posthoc.tensors().items()}
    return save(arrays)


def load_model(model_dir: str | Path) -> SavedModel:

    model_dir = Path(model_dir)
    recover_dir(model_dir)  # a replacement (fit --force) killed between its two renames
    recover_dir(model_dir / "checkpoint")
    if model_dir.is_file():
        table = Path(f"{model_dir}.json").is_file() or model_dir.suffix.lower() in (
            ".csv",
            ".parquet",
            ".npy",
        )
        what = " (a features table?)" if table else ""
        raise ArtifactError(
            f"{model_dir} is a file, not a model directory{what}; the model comes first: "
            f"tlearn predict MODEL_DIR {model_dir} (make a model with tlearn fit)"
        )
    if not model_dir.is_dir():
        raise ArtifactError(
            f"model directory {model_dir} does not exist (make one with tlearn fit)"
        )
    cfg_path = model_dir / CONFIG
    if not cfg_path.is_file() and (model_dir / "checkpoint" / "state.json").is_file():
        raise ArtifactError(
            f"{model_dir} holds an unfinished training run (no {CONFIG} yet); finish it with "
            f"tlearn fit DATA --resume {model_dir}"
        )
    if not cfg_path.is_file():
        raise ArtifactError(f"{model_dir} has no {CONFIG}: not a tlearn model directory")
    config = read_json(cfg_path, ArtifactError)
    validate_config(config, cfg_path)
    head_path = model_dir / HEAD_FILE
    if not head_path.is_file():
        raise ArtifactError(f"{model_dir} has no {HEAD_FILE}")
    try:
        tensors = load_file(str(head_path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ArtifactError(
            f"{head_path}: unreadable or truncated safetensors file ({e})"
        ) from None
    validate_tensors(config, tensors, head_path)
    backbone = None
    if HEAD_FAMILIES[config["head"]["type"]] == "nn":
        backbone = _load_backbone_tensors(model_dir, config)
    posthoc = _load_posthoc(model_dir, config)
    return SavedModel(model_dir, config, tensors, backbone, posthoc)


def _load_posthoc(model_dir: Path, config: dict) -> PostHoc | None:
    """The "calibration" section and calibration.safetensors, checked; None when the
    model has none (made by a tlearn without calibration)."""
    section = config.get("calibration")
    if section is None:
        return None
    path = model_dir / CALIBRATION_FILE
    tensors = {}
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ArtifactError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    return PostHoc.from_saved(
        section,
        tensors,
        task=config.get("task", "multi-class"),
        n_classes=len(config["classes"]),
        dim=config["feature_dim"],
        where=path if path.is_file() else model_dir / CONFIG,
    )


def _load_backbone_tensors(model_dir: Path, config: dict) -> dict[str, np.ndarray] | None:
    """The fine-tuned backbone of an nn model, checked by name and shape against the
    architecture named in the config; None when the backbone was not trained."""

    info = config.get("backbone")
    if not isinstance(info, dict) or not isinstance(info.get("trained"), bool):
        raise ArtifactError(f"{model_dir / CONFIG}: 'backbone' must say whether it was trained")
    if not info["trained"]:
        return None
    path = model_dir / BACKBONE_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{model_dir} has no {BACKBONE_FILE}, but its config says the backbone was trained"
        )
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    model = config["cut"]["model"]
    expected = _architecture_shapes(model, path)
    check_tensors(
        path, tensors, expected, subject=model, needs=f", {model} needs ", limit=1e9, first=3
    )
    return tensors


def _architecture_shapes(model_name: str, where) -> dict[str, tuple[int, ...]]:
    # only a model whose backbone was fine-tuned gets here: it needs torch anyway
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False)
    except Exception:
        raise ArtifactError(f"{where}: unknown model architecture {model_name!r}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_needs(config: dict) -> str:
    """How a head's shape error names what the config asks for."""
    n, dim = len(config["classes"]), config["feature_dim"]
    return f"; the config ({n} classes, {dim} features) needs "


def check_tensors(
    where,
    tensors: dict,
    expected: dict,
    *,
    subject: str,
    needs: str,
    bounds: dict[str, tuple[float, float]] | None = None,
    limit: float = MAX_WEIGHT,
    first: int | None = None,
) -> None:
    """Refuse tensors that are not exactly `expected` (names and shapes), that are not
    float (integer only for batch-norm counters), or hold NaN, infinite or absurd values:
    every value within +-`limit` unless `bounds` names its (low, high) for that tensor.
    `subject` names what they must match, `needs` leads into the shape."""
    names, want = set(tensors), set(expected)
    if names != want:
        missing, extra = sorted(want - names)[:first], sorted(names - want)[:first]
        raise ArtifactError(
            f"{where}: tensors do not match {subject} (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'})"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ArtifactError(f"{where}: tensor {name} has shape {got}{needs}{shape}")
        t = np.asarray(tensors[name])
        counter = name.endswith("num_batches_tracked")
        if t.dtype.kind not in ("iu" if counter else "f"):
            kind = "an integer" if counter else "a float"
            raise ArtifactError(f"{where}: tensor {name} has dtype {t.dtype}, expected {kind} type")
        if counter:
            continue
        if not np.all(np.isfinite(t)):
            raise ArtifactError(f"{where}: tensor {name} holds NaN or infinite values")
        low, high = (bounds or {}).get(name, (-limit, limit))
        if t.size and (t.min() < low or t.max() > high):
            raise ArtifactError(
                f"{where}: tensor {name} holds values outside {low:g}..{high:g} "
                f"(from {float(t.min()):g} to {float(t.max()):g}); the file is damaged or "
                "not from tlearn"
            )


def validate_config(config: dict, where) -> None:
    """Every field predict reads, by type and range: one ArtifactError line naming the file
    and the field, never a KeyError/TypeError later or NaN scores."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ArtifactError(f"{where}: missing key(s) {', '.join(missing)}")
    if config["format"] != FORMAT:
        raise ArtifactError(f"{where}: format is {shown(config['format'])}, expected {FORMAT!r}")
    if not is_int(config["format_version"]) or config["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format_version {shown(config['format_version'])} is not supported by "
            f"tlearn {__version__} (supports {FORMAT_VERSION}); upgrade tlearn or refit the model"
        )
    classes = config["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ArtifactError(f"{where}: 'classes' must list at least two distinct class names")
    head = config["head"]
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise ArtifactError(f"{where}: 'head' must be an object with a 'type'")
    if head["type"] not in HEAD_FAMILIES:
        raise ArtifactError(f"{where}: unknown head type {shown(head['type'])}")
    check_cut(config["cut"], where)
    check_data_config(config["data_config"], where)
    dim = config["feature_dim"]
    need(
        is_int(dim) and 1 <= dim <= MAX_FEATURE_DIM, where, "feature_dim", "a positive integer", dim
    )
    tta = config.get("tta")
    if tta is not None and (not isinstance(tta, dict) or tta.get("chosen") not in ("none", "flip")):
        raise ArtifactError(f"{where}: 'tta.chosen' must be 'none' or 'flip', got {shown(tta)}")
    if config.get("task", "multi-class") not in TASKS:
        raise ArtifactError(f"{where}: 'task' must be one of {', '.join(TASKS)}")
    if HEAD_FAMILIES[head["type"]] == "linear":
        check_linear_hyper(head, where)


def check_linear_hyper(head: dict, where) -> None:
    """What LinearHead.from_saved reads from an svm/logreg head's config."""
    c = head.get("C")
    need(c is None or (is_number(c) and c > 0), where, "head.C", "a positive number", c)
    seed = head.get("seed", 0)
    need(is_int(seed), where, "head.seed", "an integer", seed)


def validate_tensors(config: dict, tensors: dict, where) -> None:

    if HEAD_FAMILIES[config["head"]["type"]] == "nn":
        validate_head_tensors(config, tensors, where)
        return

    expected = LinearHead.expected_shapes(len(config["classes"]), config["feature_dim"])
    check_tensors(
        where,
        tensors,
        expected,
        subject="the config",
        needs=config_needs(config),
        bounds=LINEAR_BOUNDS,
    )


def validate_head_tensors(config: dict, tensors: dict, where) -> None:
    """Refuse a head file whose tensors do not match config.json exactly."""
    head = config["head"]
    if head.get("type") == "mlp" and (
        not isinstance(head.get("hidden"), list)
        or not all(is_int(h) and 0 < h <= MAX_HIDDEN for h in head["hidden"])
    ):
        raise ArtifactError(f"{where}: head 'hidden' must be a list of positive sizes")
    if not isinstance(head.get("dropout"), (int, float)):
        raise ArtifactError(f"{where}: head 'dropout' is missing")
    p, bn = head["dropout"], head.get("batchnorm", False)
    need(is_number(p) and 0 <= p < 1, where, "head.dropout", "from 0 to below 1", p)
    need(isinstance(bn, bool), where, "head.batchnorm", "true or false", bn)

    expected = neural_shapes(head, config["feature_dim"], len(config["classes"]))
    subject = f"the {head['type']} head in the config"
    bounds = {k: (0.0, MAX_WEIGHT) for k in expected if k.endswith("running_var")}
    check_tensors(
        where, tensors, expected, subject=subject, needs=config_needs(config), bounds=bounds
    )


def model_sha256(model_dir: str | Path) -> str:
    """Identity of a model directory: its config and tensors."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted(root.iterdir()):
        if p.name == "config.json" or p.suffix == ".safetensors":
            h.update(p.name.encode("utf-8") + b"\0" + p.read_bytes())
    return h.hexdigest()
