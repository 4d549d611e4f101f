"""Duplicates for `tlearn audit`: exact (the same bytes) and near (the same picture
re-encoded, resized or slightly cropped), within a split and across train/val.

Exact duplicates share the feature cache's key of an image, the sha256 of its bytes
(core.hashing.content_key through cache.store.hash_files). Near duplicates are pairs
whose pooled features have a cosine similarity at or above a threshold.

How the pairs are found: exact blocked matrix products (`similar_pairs`). Each block of
rows of the unit-normalised feature matrix is multiplied with the rows at or after it
(the upper triangle: n^2/2 dot products, one BLAS call per block) and only the entries
at or above the threshold are kept, so memory stays at one block of at most 2^25
similarities. Measured on this project's 2-core machine with 20,000 random 1280-d
vectors and 200 planted pairs (benchmarks/dup_index.py, docs/benchmarks.md section 11):
blocked products 5.6 s; faiss's exact IndexFlatIP range search 5.9x that (its range
search does not batch into one matrix product); usearch's HNSW graph (build + 10-NN
search) 22x, being approximate besides. All three found the 200 pairs. So tlearn uses
the blocked products: exact, fastest at the sizes audits see, and no new dependency;
100,000 images take minutes on 2 cores (docs/benchmarks.md), less than extracting their
features. An approximate index would pay only far beyond that, where n^2 grows past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 2048
BLOCK_ENTRIES = 1 << 25  # one block of similarities: at most 128 MiB of float32
MAX_PAIRS = 200_000  # a threshold far too low would otherwise list every pair


@dataclass(frozen=True)
class Pair:
    """Two images (row numbers) that look the same; `a` < `b` unless reordered for leakage."""

    a: int
    b: int
    similarity: float
    kind: str  # "exact" (same bytes) or "near"


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero), float32."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def block_rows(n_columns: int) -> int:
    """Rows per block so that one block of similarities stays within BLOCK_ENTRIES."""
    return int(max(16, min(BLOCK_ROWS, BLOCK_ENTRIES // max(1, n_columns))))


def similar_pairs(
    Z: np.ndarray, threshold: float, *, block: int | None = None, limit: int = MAX_PAIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(i, j, cosine similarity, truncated) for every pair i < j of unit rows of `Z` with
    similarity >= threshold, most similar first; at most `limit` pairs (then truncated)."""
    n = len(Z)
    block = block or block_rows(n)
    ii, jj, ss = [], [], []
    kept = 0
    truncated = False
    for start in range(0, n, block):
        stop = min(n, start + block)
        S = Z[start:stop] @ Z[start:].T  # rows start..stop against columns start..n
        r, c = np.nonzero(S >= threshold)
        keep = c > r  # the upper triangle only: j > i, never an image with itself
        r, c = r[keep], c[keep]
        ii.append(r + start)
        jj.append(c + start)
        ss.append(S[r, c])
        kept += len(r)
        if kept > 4 * limit:  # keep memory bounded; the best are kept below
            i, j, s = _best(ii, jj, ss, limit)
            ii, jj, ss, kept, truncated = [i], [j], [s], len(i), True
    i, j, s = _best(ii, jj, ss, limit)
    return i, j, s, truncated or sum(map(len, ss)) > limit


def _best(ii, jj, ss, limit):
    i = np.concatenate(ii) if ii else np.zeros(0, np.int64)
    j = np.concatenate(jj) if jj else np.zeros(0, np.int64)
    s = np.concatenate(ss) if ss else np.zeros(0, np.float32)
    order = np.lexsort((j, i, -s))[:limit]  # most similar first, then by position
    return i[order], j[order], s[order]


def exact_groups(keys: Sequence[bytes | None]) -> list[list[int]]:
    """Rows with the same content key, as groups of 2 or more (in row order)."""
    groups: dict[bytes, list[int]] = {}
    for row, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(row)
    return [g for g in groups.values() if len(g) > 1]


def find_duplicates(
    X: np.ndarray,
    keys: Sequence[bytes | None],
    splits: Sequence[str],
    threshold: float,
    *,
    limit: int = MAX_PAIRS,
) -> tuple[list[Pair], bool]:
    """Exact and near-duplicate pairs among the rows of `X`, leakage across splits first
    (the train image as `a`), then exact before near, then by similarity. Each exact group
    of m copies gives m - 1 pairs (every copy with the first), not m(m-1)/2.
    Returns (pairs, truncated)."""
    exact: set[tuple[int, int]] = set()
    pairs: list[Pair] = []
    same_bytes: dict[int, int] = {}  # row -> first row with the same bytes
    for group in exact_groups(keys):
        for row in group[1:]:
            exact.add((group[0], row))
            same_bytes[row] = group[0]
            pairs.append(Pair(group[0], row, 1.0, "exact"))
    i, j, s, truncated = similar_pairs(unit_rows(X), threshold, limit=limit)
    for a, b, sim in zip(i.tolist(), j.tolist(), s.tolist(), strict=True):
        if same_bytes.get(b, -1) == same_bytes.get(a, a) or (a, b) in exact:
            continue  # copies of one file: listed once, as exact
        pairs.append(Pair(a, b, min(1.0, float(sim)), "near"))
    pairs = [_train_first(p, splits) for p in pairs]
    leak = [splits[p.a] != splits[p.b] for p in pairs]
    order = sorted(
        range(len(pairs)),
        key=lambda k: (not leak[k], pairs[k].kind != "exact", -pairs[k].similarity, pairs[k].a),
    )
    return [pairs[k] for k in order][:limit], truncated or len(pairs) > limit


def _train_first(p: Pair, splits: Sequence[str]) -> Pair:
    if splits[p.a] != splits[p.b] and splits[p.a] != "train" and splits[p.b] == "train":
        return Pair(p.b, p.a, p.similarity, p.kind)
    return p
