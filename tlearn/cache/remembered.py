"""What a request resolved to, remembered in the cache so that later runs need no torch:
the CutSpec and timm's data config of a (model, weights, layer, pool) request
(`resolved/cut-<key>.json`) and the PIL steps of that data config's eval transform
(`resolved/pixels-<key>.json`), and a model's cut points (`resolved/layers-<key>.json`, so
--layer and --freeze-to are checked before torch loads). Keys include the library
versions, so an upgrade resolves again. See features.engine for how warm runs use them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tlearn.core.atomic import write_json
from tlearn.core.cachedir import ensure_root
from tlearn.core.checks import check_cut, check_data_config
from tlearn.core.errors import ArtifactError
from tlearn.core.hashing import doc_sha256, file_sha256
from tlearn.core.known_layers import KNOWN_LAYERS
from tlearn.core.layers import LayerNames, resolve_layer_names
from tlearn.core.spec import BUNDLED_WEIGHTS, CutSpec, bundled_weights_file
from tlearn.core.system import dist_version
from tlearn.core.version import __version__
from tlearn.data.pixels import PilSteps

FORMAT = 1


def _versions() -> dict:

    return {name: dist_version(name) for name in ("timm", "torch", "torchvision")} | {
        "tlearn": __version__
    }


def weights_identity(model: str, weights: str, seed: int) -> dict | None:
    """What the weights of a request are, without loading them; None when only loading
    can tell (timm's hub weights)."""
    if weights == "none":  # random init: a function of the seed and the versions
        return {"source": "none", "seed": int(seed)}
    if weights == "auto":
        path = bundled_weights_file(model)
        if path is None:
            return None
        return {"source": f"bundled:{BUNDLED_WEIGHTS[model]}", "sha256": file_sha256(path)}
    path = Path(weights).expanduser()
    if not path.is_file():
        return None  # the ordinary path words the error
    return {"source": str(path.resolve()), "sha256": file_sha256(path)}


def loaded_identity(loaded, seed: int) -> dict | None:
    """weights_identity from a loaded backbone's backbone.Weights (already hashed), so a
    cold run does not read the weights file a second time."""
    if loaded.source == "none":
        return {"source": "none", "seed": int(seed)}
    if loaded.source.startswith("timm:"):
        return None
    return {"source": loaded.source, "sha256": loaded.sha256}


def request_key(
    model: str, weights: str, layers, pool: str, seed: int, identity: dict | None = None
) -> str | None:
    """The key a request's resolved cut is remembered under; `identity`: its
    weights_identity when already known."""
    ident = identity if identity is not None else weights_identity(model, weights, seed)
    if ident is None:
        return None
    if not isinstance(layers, (str, type(None))):
        layers = list(layers)
    doc = {"format": FORMAT, "model": model, "weights": ident, "layers": layers, "pool": pool}
    return doc_sha256({**doc, "versions": _versions()})


def pixels_key(data_config: dict) -> str:
    return doc_sha256({"format": FORMAT, "data_config": data_config, "versions": _versions()})


def _folder(root: Path) -> Path:
    return Path(root) / "resolved"


def _write(path: Path, doc: dict) -> None:
    """The document with its checksum (sha256 of its canonical JSON), atomically."""
    with contextlib.suppress(OSError):  # the cache only ever saves time
        ensure_root(path.parent.parent)  # the cache root, marked as tlearn's
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"doc": doc, "sha256": doc_sha256(doc)})


def _read(path: Path, notes: list[str] | None = None) -> dict | None:
    """The document, or None when absent; one that fails its checksum (damaged, or written
    before checksums) is deleted, so the run resolves it again and rewrites it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    try:
        wrapper = json.loads(text)
        doc = wrapper["doc"]
        if isinstance(doc, dict) and doc_sha256(doc) == wrapper["sha256"]:
            return doc
    except (ValueError, RecursionError, KeyError, TypeError):
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    if notes is not None:
        notes.append(
            f"cache file {path} was damaged (checksum mismatch); discarded, resolved again"
        )
    return None


def remember_cut(root: Path | None, key: str | None, spec: CutSpec, data_config: dict) -> None:
    if root is not None and key is not None:
        doc = {"spec": spec.to_dict(), "data_config": data_config}
        _write(_folder(root) / f"cut-{key}.json", doc)


def remember_pixels(root: Path | None, data_config: dict, pixels) -> None:
    """`pixels`: preprocess.split_eval_transform's (transform, mean, std) or None."""

    if root is None or pixels is None or not isinstance(pixels[0], PilSteps):
        return
    doc = {"steps": pixels[0].to_dict(), "mean": pixels[1], "std": pixels[2]}
    path = _folder(root) / f"pixels-{pixels_key(data_config)}.json"
    if _read(path) is None:
        _write(path, doc)


def recall_cut(root: Path, key: str, notes: list[str] | None = None):
    """(CutSpec, data config) remembered for a request key, or None."""
    doc = _read(_folder(root) / f"cut-{key}.json", notes)
    try:
        check_data_config(doc["data_config"], "remembered cut")
        check_cut(doc["spec"], "remembered cut")
        return CutSpec.from_dict(doc["spec"]), doc["data_config"]
    except (KeyError, TypeError, ValueError, ArtifactError):
        return None


def recall_pixels(root: Path, data_config: dict, notes: list[str] | None = None):

    doc = _read(_folder(root) / f"pixels-{pixels_key(data_config)}.json", notes)
    try:
        return PilSteps.from_dict(doc["steps"]), doc["mean"], doc["std"]
    except (KeyError, TypeError, ValueError):
        return None


def _layers_path(root: Path, model: str) -> Path:
    key = doc_sha256({"format": FORMAT, "model": model, "timm": dist_version("timm")})
    return _folder(root) / f"layers-{key[:24]}.json"


def remember_layers(root: Path | None, names: LayerNames) -> None:
    """A model's cut points, read off the network by a run that loaded it."""
    if root is not None and names.model not in KNOWN_LAYERS:
        path = _layers_path(root, names.model)
        if _read(path) is None:
            _write(path, names.to_dict())


def recall_layers(root: Path | None, model: str) -> LayerNames | None:
    """A model's cut points without loading it: bundled backbones' are known, others' as
    remembered by an earlier run (with this timm); None when neither."""
    if model in KNOWN_LAYERS:
        names, stages = KNOWN_LAYERS[model]
        return LayerNames(model, names, stages)
    doc = _read(_layers_path(root, model)) if root is not None else None
    try:
        found = LayerNames.from_dict(doc)
    except (KeyError, TypeError, ValueError):
        return None
    return found if found.model == model else None


def check_layers(root: Path | None, model: str, requested, option: str = "--layer") -> None:
    """Refuse an unknown --layer/--freeze-to before torch loads, when the model's cut
    points are known or remembered (else loading the model checks them)."""
    known = recall_layers(root, model)
    if known is not None:
        resolve_layer_names(requested, known, option)
