"""On-disk feature cache: re-fitting with another C or head, or evaluating on the same
images, reads features instead of running the backbone again.

Key. One folder per *cut*: hash of (model, weights sha256, layers, pool, data config,
decode settings, numeric precision, timm/Pillow versions, cache format). Inside it,
features are keyed by the **sha256 of the image file's bytes**, computed by the decoding
worker from the very bytes it decodes. Content hashing was chosen over (path, size,
mtime): it can never return features of an older version of a file (mtime has coarse
granularity, and copies/restores/syncs can keep size and mtime while changing content),
and it keeps hitting when images are moved or renamed between class folders. Its cost is
reading each file once, which a cache miss needs anyway for decoding and which is small
next to decoding + forward (see docs/benchmarks.md).

Lookups: when the cache already holds entries for the cut, the files are hashed first
(a few threads), so cached images are read from the cache without starting decoding
workers, and only the others are decoded. For a cut with no entries yet that pass is
skipped, so a cold run reads each file once.

Layout: <root>/features/<cut key>/{cut.json, <shard>.feats.npy, <shard>.keys.npy}.
A shard is committed by writing its features, then its keys, each atomically (temporary
name + rename), so readers only ever see complete shards; concurrent runs simply add
shards (a duplicate key is harmless: same bytes, same features). Readers memory-map the
shards, so a cache far larger than RAM is fine, and deleting shards under a running
reader is safe on POSIX. No pickle: .npy files are loaded with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file, write_json
from tlearn.core.hashing import content_key, doc_sha256, file_key
from tlearn.core.system import dist_version

CACHE_FORMAT = 1
KEY_BYTES = 32  # sha256 digest
FLUSH_BYTES = 16 << 20  # commit a shard once this many feature bytes are buffered
COMPACT_SHARDS = 64  # merge small shards once a cut folder has more than this many
SMALL_SHARD_ROWS = 1024


def cache_root() -> Path:
    """$TLEARN_CACHE_DIR, else $XDG_CACHE_HOME/tlearn, else ~/.cache/tlearn."""
    env = os.environ.get("TLEARN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "tlearn"
    return Path.home() / ".cache" / "tlearn"


def hash_files(paths: Sequence[str], threads: int | None = None) -> list[bytes | None]:
    """file_key of each path (None where it cannot be read), by one thread per core (at
    most 4) working through runs of files: reading and sha256 release the GIL, which
    helps on cold or network storage, and one task per run rather than per file keeps
    the pool's overhead low. 6,368 page-cached 250 px JPEGs on 2 cores: 0.15 s with 2
    threads, 0.24 s with 4, 0.45 s with a task per file."""

    if threads is None:
        threads = min(4, os.cpu_count() or 1)

    def one(path):
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return None  # FIFOs and devices must not be opened; decoding says why
            if st.st_size > 16 << 20:
                return file_key(path)
            with open(path, "rb") as f:
                return content_key(f.read())
        except OSError:
            return None

    if len(paths) < 64:
        return [one(p) for p in paths]
    runs = [paths[i : i + 64] for i in range(0, len(paths), 64)]
    with ThreadPoolExecutor(threads, thread_name_prefix="tlearn-hash") as pool:
        return [key for run in pool.map(lambda r: [one(p) for p in r], runs) for key in run]


def cut_key(
    spec,
    data_config: dict,
    *,
    draft: bool,
    precision: str,
    view: str = "plain",
    decoder: str = "cpu",
) -> tuple[str, dict]:
    """(hex key, the document it hashes) for one cut + preprocessing. `view`: "plain", or
    "hflip" for the features of the mirror images (training with --augment flip).
    Features of JPEGs decoded on the GPU (`decoder` "gpu": nvJPEG, resized by torch)
    differ slightly from Pillow's, so they get their own key; the CPU key is what it
    always was."""

    decode: dict = {"jpeg_draft": bool(draft)}
    if decoder != "cpu":
        decode["decoder"] = decoder
    doc = {
        "format": CACHE_FORMAT,
        "cut": spec.identity(),
        "data_config": data_config,
        "decode": decode,
        "precision": precision,
        "timm": dist_version("timm"),
        "pillow": dist_version("pillow"),
    }
    if view != "plain":  # plain keys stay as they were: caches written before still hit
        doc["view"] = view
    return doc_sha256(doc), doc


class KeySet:
    """Sorted content keys, for membership tests in decoding workers (picklable, small:
    32 bytes per cached image)."""

    def __init__(self, keys: np.ndarray | None = None):
        self.sorted = np.sort(keys) if keys is not None and len(keys) else np.zeros(0, "S32")

    def __len__(self) -> int:
        return len(self.sorted)

    def positions(self, keys: Sequence[bytes]) -> np.ndarray:
        """Index into `sorted` for each key, -1 where absent."""
        q = np.asarray(keys, dtype="S32")
        if len(self.sorted) == 0 or len(q) == 0:
            return np.full(len(q), -1, dtype=np.int64)
        pos = np.searchsorted(self.sorted, q)
        pos = np.minimum(pos, len(self.sorted) - 1)
        found = self.sorted[pos] == q
        return np.where(found, pos, -1)

    def __contains__(self, key: bytes) -> bool:
        return bool(self.positions([key])[0] >= 0)


def _as_s32(keys_u8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys_u8, dtype=np.uint8).reshape(-1, KEY_BYTES).view("S32")[:, 0]


@dataclass
class _Shard:
    name: str
    feats: np.ndarray  # memory-mapped (n, D)


@dataclass
class FeatureStore:
    """The cached features of one cut. Open with `FeatureStore.open`."""

    folder: Path
    doc: dict
    dim: int | None = None
    known: KeySet = field(default_factory=KeySet)
    notes: list[str] = field(default_factory=list)
    _shards: list[_Shard] = field(default_factory=list)
    _where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    _pending_keys: list[bytes] = field(default_factory=list)
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_bytes: int = 0
    _written: int = 0
    _write_failed: bool = False
    served: int = 0  # images read from the cache
    dtype: str = "float32"  # float16 for cached maps of a frozen prefix (train.frozen)

    @classmethod
    def open(
        cls,
        root: Path,
        spec,
        data_config: dict,
        *,
        draft: bool,
        precision: str,
        view="plain",
        dtype: str = "float32",
        decoder="cpu",
    ):
        key, doc = cut_key(
            spec, data_config, draft=draft, precision=precision, view=view, decoder=decoder
        )
        if dtype != "float32":  # float32 keys stay as they were
            key, doc = doc_sha256({**doc, "dtype": dtype}), {**doc, "dtype": dtype}
        store = cls(folder=Path(root) / "features" / key, doc=doc, dtype=dtype)
        store._load()
        return store

    # -- reading

    def _load(self) -> None:
        """Memory-map every complete shard and index its keys."""
        if not self.folder.is_dir():
            return
        keys, where = [], []
        for kpath in sorted(self.folder.glob("*.keys.npy")):
            name = kpath.name[: -len(".keys.npy")]
            try:
                k = np.load(kpath, allow_pickle=False)
                f = np.load(self.folder / f"{name}.feats.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                continue  # removed under us, or damaged: those images are simply misses
            if k.ndim != 2 or k.shape[1] != KEY_BYTES or f.ndim != 2 or len(f) != len(k):
                continue
            if f.dtype != np.dtype(self.dtype):
                continue
            if self.dim is None:
                self.dim = int(f.shape[1])
            if f.shape[1] != self.dim:
                continue
            s = len(self._shards)
            self._shards.append(_Shard(name, f))
            keys.append(_as_s32(k))
            where.append(np.stack([np.full(len(k), s), np.arange(len(k))], axis=1))
        if keys:
            all_keys = np.concatenate(keys)
            all_where = np.concatenate(where)
            order = np.argsort(all_keys, kind="stable")
            self.known = KeySet.__new__(KeySet)
            self.known.sorted = all_keys[order]
            self._where = all_where[order]

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        """Features for keys that are all in `known`, in the order given."""
        pos = self.known.positions(keys)
        if (pos < 0).any():
            raise KeyError("feature cache lookup of an image that is not cached")
        self.served += len(keys)
        out = np.empty((len(keys), self.dim or 0), dtype=self.dtype)
        where = self._where[pos]
        for s in np.unique(where[:, 0]):
            sel = np.nonzero(where[:, 0] == s)[0]
            out[sel] = self._shards[int(s)].feats[where[sel, 1]]
        return out

    # -- writing

    def put(self, keys: Sequence[bytes], feats: np.ndarray) -> None:
        """Buffer newly computed features; committed as a shard every FLUSH_BYTES."""
        if self._write_failed or len(keys) == 0:
            return
        feats = np.asarray(feats, dtype=self.dtype)
        self._pending_keys.extend(keys)
        self._pending.append(feats)
        self._pending_bytes += feats.nbytes
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending_keys or self._write_failed:
            self._pending_keys, self._pending, self._pending_bytes = [], [], 0
            return
        keys = np.frombuffer(b"".join(self._pending_keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        feats = np.concatenate(self._pending)
        self._pending_keys, self._pending, self._pending_bytes = [], [], 0
        try:
            self._ensure_folder()
            name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            _save_npy(self.folder / f"{name}.feats.npy", feats)
            _save_npy(self.folder / f"{name}.keys.npy", keys)  # the commit
            self._written += len(keys)
        except OSError as e:
            self._write_failed = True
            self.notes.append(f"feature cache not written ({e.strerror or e}); continuing without")

    def close(self) -> None:
        """Commit what is buffered, then merge small shards if there are many."""
        self.flush()
        if self._written and not self._write_failed:
            with contextlib.suppress(OSError):
                compact(self.folder)

    @property
    def written(self) -> int:
        return self._written

    def _ensure_folder(self) -> None:
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "cut.json"
        if not meta.exists():
            write_json(meta, self.doc)


def _save_npy(path: Path, arr: np.ndarray) -> None:

    with atomic_file(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".keys.npy")] for p in folder.glob("*.keys.npy"))


def _remove_shard(folder: Path, name: str) -> None:
    # Keys first: without them the shard is invisible to readers.
    for suffix in (".keys.npy", ".feats.npy"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / f"{name}{suffix}")


def compact(folder: Path, max_shards: int = COMPACT_SHARDS) -> int:
    """Merge small shards into one once there are more than `max_shards`. Safe beside
    readers (they memory-mapped the old files) and other writers (a merge that runs twice
    only duplicates keys). Returns the number of shards merged."""
    names = shard_names(folder)
    if len(names) <= max_shards:
        return 0
    small, keys, feats = [], [], []
    for name in names:
        try:
            k = np.load(folder / f"{name}.keys.npy", allow_pickle=False)
            if len(k) >= SMALL_SHARD_ROWS:
                continue
            f = np.load(folder / f"{name}.feats.npy", allow_pickle=False)
        except (OSError, ValueError):
            continue
        if feats and f.shape[1:] != feats[0].shape[1:]:
            continue
        small.append(name)
        keys.append(k)
        feats.append(f)
    if len(small) < 2:
        return 0
    merged = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _save_npy(folder / f"{merged}.feats.npy", np.concatenate(feats))
    _save_npy(folder / f"{merged}.keys.npy", np.concatenate(keys))
    for name in small:
        _remove_shard(folder, name)
    return len(small)
