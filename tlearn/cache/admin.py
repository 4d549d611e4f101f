"""`tlearn cache info|clear`: what the cache holds per cut, and deleting only what
tlearn wrote."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlearn.cache.store import cache_root, shard_names
from tlearn.core.cachedir import ENV, MARKER, chosen_by_env, is_marked
from tlearn.core.errors import UsageError

# ----------------------------------------------------------------------------- info / clear


@dataclass
class CutInfo:
    key: str
    model: str
    layers: list[str]
    pool: str
    images: int
    dim: int | None
    bytes: int


@dataclass
class CacheInfo:
    root: str
    cuts: list[CutInfo]
    onnx_models: int
    onnx_bytes: int
    total_bytes: int


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def cache_info(root: Path | None = None) -> CacheInfo:
    root = Path(root) if root is not None else cache_root()
    cuts: list[CutInfo] = []
    feats_dir = root / "features"
    if feats_dir.is_dir():
        for folder in sorted(p for p in feats_dir.iterdir() if p.is_dir()):
            try:
                doc = json.loads((folder / "cut.json").read_text(encoding="utf-8"))
                cut = doc.get("cut", {})
            except (OSError, ValueError):
                cut = {}
            images, dim = 0, None
            for name in shard_names(folder):
                try:
                    k = np.load(folder / f"{name}.keys.npy", mmap_mode="r", allow_pickle=False)
                    f = np.load(folder / f"{name}.feats.npy", mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError):
                    continue
                images += len(k)
                dim = int(f.shape[1]) if f.ndim == 2 else dim
            cuts.append(
                CutInfo(
                    key=folder.name,
                    model=str(cut.get("model", "?")),
                    layers=list(cut.get("layers", [])),
                    pool=str(cut.get("pool", "?")),
                    images=images,
                    dim=dim,
                    bytes=_folder_bytes(folder),
                )
            )
    onnx_dir = root / "onnx"
    onnx_files = list(onnx_dir.glob("*.onnx")) if onnx_dir.is_dir() else []
    onnx_bytes = _folder_bytes(onnx_dir) if onnx_dir.is_dir() else 0
    return CacheInfo(
        root=str(root),
        cuts=cuts,
        onnx_models=len(onnx_files),
        onnx_bytes=onnx_bytes,
        total_bytes=sum(c.bytes for c in cuts) + onnx_bytes,
    )


def clear_cache(root: Path | None = None) -> int:
    """Delete cached features, exported models and resolved cuts (tlearn.warm); returns
    the bytes freed. Only the folders tlearn creates are removed, never the root itself
    or other files."""
    root = Path(root) if root is not None else cache_root()
    if root.is_dir() and not is_marked(root) and chosen_by_env():
        raise UsageError(
            f"{ENV}={root} has no {MARKER} marker, so tlearn did not create it (or created it "
            "before markers existed); nothing was deleted. Point TLEARN_CACHE_DIR at tlearn's "
            f"cache, or delete its features/, onnx/ and resolved/ folders by hand"
        )
    freed = 0
    for sub in ("features", "onnx", "resolved"):
        folder = root / sub
        if folder.is_dir():
            freed += _folder_bytes(folder)
            # Rename first, so a concurrent run never sees a half-deleted folder.
            tmp = Path(tempfile.mkdtemp(prefix=f".{sub}.", suffix=".old", dir=root))
            os.replace(folder, tmp / sub)
            shutil.rmtree(tmp, ignore_errors=True)
    return freed
