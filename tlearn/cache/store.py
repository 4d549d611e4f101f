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

Layout: <root>/features/<cut key>/{cut.json, <shard>.feats.npy, <shard>.keys.npy,
<shard>.sum.json}. A shard is committed by writing its features, then its keys, then the
blake2b digests of the features' data and the keys file (the commit), each atomically
(temporary name + rename), so readers only ever see complete shards. Keys are checked
against their digest when a cut is opened; features when a run first needs a shard (one
pass over its bytes).
A shard that fails either check is deleted, its images recomputed, and a note says so;
shards without digests (written before they existed) are ignored. Concurrent runs simply add
shards (a duplicate key is harmless: same bytes, same features). Readers memory-map the
shards, so a cache far larger than RAM is fine, and deleting shards under a running
reader is safe on POSIX. No pickle: .npy files are loaded with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file, write_json
from tlearn.core.cachedir import ensure_root
from tlearn.core.hashing import blake2b_hex, content_key, doc_sha256, file_key
from tlearn.core.system import dist_version

CACHE_FORMAT = 1
SUM = ".sum.json"  # a shard's digests: its commit
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
    digest: str  # blake2b of the .feats.npy file
    verified: bool = False


def read_sums(folder: Path, name: str) -> dict | None:
    """The digests of a committed shard, or None when it has none (or they are damaged)."""
    try:
        doc = json.loads((folder / f"{name}{SUM}").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(doc, dict) and all(isinstance(doc.get(k), str) for k in ("feats", "keys"))
    return doc if ok else None


def load_keys(folder: Path, name: str, sums: dict) -> np.ndarray | None:
    """A shard's keys, read and checked against their digest; None if they do not match."""
    data = (folder / f"{name}.keys.npy").read_bytes()
    if blake2b_hex(data) != sums["keys"]:
        return None
    return np.load(io.BytesIO(data), allow_pickle=False)


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
        """Memory-map every committed shard and index its keys (checked by digest)."""
        if not self.folder.is_dir():
            return
        keys, where = [], []
        for name in shard_names(self.folder):
            sums = read_sums(self.folder, name)
            if sums is None:
                continue
            try:
                k = load_keys(self.folder, name, sums)
                if k is None:
                    self._discard(name, "keys")
                    continue
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
            self._shards.append(_Shard(name, f, sums["feats"]))
            keys.append(_as_s32(k))
            where.append(np.stack([np.full(len(k), s), np.arange(len(k))], axis=1))
        self._index(keys, where)

    def _index(self, keys: list, where: list) -> None:
        if keys:
            all_keys = np.concatenate(keys)
            all_where = np.concatenate(where)
            order = np.argsort(all_keys, kind="stable")
            self.known = KeySet.__new__(KeySet)
            self.known.sorted = all_keys[order]
            self._where = all_where[order]
        else:
            self.known, self._where = KeySet(), np.zeros((0, 2), np.int64)

    def _discard(self, name: str, what: str) -> None:
        self.notes.append(
            f"feature cache: shard {name} in {self.folder} was damaged ({what} do not match "
            "their checksum); discarded, its images are computed again"
        )
        _remove_shard(self.folder, name)

    def hits(self, keys: Sequence[bytes]) -> np.ndarray:
        """Which keys the cache can serve, after checking the features of every shard they
        come from against its digest (once per shard): a damaged shard is discarded and
        its images become misses."""
        pos = self.known.positions(keys)
        found = pos >= 0
        shards = np.unique(self._where[pos[found], 0]) if found.any() else []
        bad = []
        for s in shards:
            shard = self._shards[int(s)]
            if shard.verified:
                continue
            try:
                shard.verified = data_digest(shard.feats) == shard.digest
            except (OSError, ValueError):
                shard.verified = False
            if not shard.verified:
                bad.append(int(s))
                self._discard(shard.name, "features")
        if bad:
            keep = ~np.isin(self._where[:, 0], bad)
            self._where, self.known.sorted = self._where[keep], self.known.sorted[keep]
            found = self.known.positions(keys) >= 0
        return found

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        """Features for keys that are all in `known`, in the order given."""
        if not self.hits(keys).all():  # checks each shard's digest once
            raise KeyError("feature cache lookup of an image that is not cached")
        pos = self.known.positions(keys)
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
            save_shard(self.folder, feats, keys)
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
            ensure_root(self.folder.parent.parent)  # the cache root, marked as tlearn's
            self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "cut.json"
        if not meta.exists():
            write_json(meta, self.doc)


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` as .npy atomically; returns the blake2b digest of the file's bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    with atomic_file(path, "wb") as f:
        f.write(data)
    return blake2b_hex(data)


def data_digest(arr: np.ndarray) -> str:
    """blake2b of an array's raw bytes: checkable on a memory map even after its file was
    deleted (compacted) under a running reader."""
    return blake2b_hex(memoryview(np.ascontiguousarray(arr)).cast("B"))


def save_shard(folder: Path, feats: np.ndarray, keys: np.ndarray) -> str:
    """Commit one shard: features, keys, then their digests (the commit)."""
    name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    feats = np.ascontiguousarray(feats)
    _save_npy(folder / f"{name}.feats.npy", feats)
    sums = {
        "feats": data_digest(feats),
        "keys": _save_npy(folder / f"{name}.keys.npy", keys),
    }
    write_json(folder / f"{name}{SUM}", sums)
    return name


def shard_names(folder: Path) -> list[str]:
    """Committed shards (those with digests), by name."""
    return sorted(p.name[: -len(SUM)] for p in folder.glob(f"*{SUM}"))


def _remove_shard(folder: Path, name: str) -> None:
    # Digests first: without them the shard is invisible to readers.
    for suffix in (SUM, ".keys.npy", ".feats.npy"):
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
        sums = read_sums(folder, name)
        try:
            k = load_keys(folder, name, sums) if sums is not None else None
            if k is None or len(k) >= SMALL_SHARD_ROWS:
                continue
            f = np.load(folder / f"{name}.feats.npy", allow_pickle=False)
            if data_digest(f) != sums["feats"]:
                continue  # damaged: never merged into a shard with a fresh digest
        except (OSError, ValueError):
            continue
        if feats and f.shape[1:] != feats[0].shape[1:]:
            continue
        small.append(name)
        keys.append(k)
        feats.append(f)
    if len(small) < 2:
        return 0
    save_shard(folder, np.concatenate(feats), np.concatenate(keys))
    for name in small:
        _remove_shard(folder, name)
    return len(small)
