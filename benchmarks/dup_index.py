"""Near-duplicate search for `tlearn audit`: tlearn's blocked matrix products against
faiss (exact inner-product range search) and usearch (HNSW graph, approximate), when
they are installed (they are not tlearn dependencies; e.g. `pip install --target DIR
faiss-cpu usearch` and PYTHONPATH=DIR).

Random unit vectors have no near duplicates, so `--planted` pairs are added: a copy of
a random vector plus noise (cosine similarity ~0.9). Every method searches for all pairs
with similarity >= `--threshold`; reported: seconds (build + search), pairs found,
recall of the exact answer (the blocked search is exact), as ratios to the blocked
search measured in the same run.

    python benchmarks/dup_index.py --n 20000 --dim 1280
"""

from __future__ import annotations

import argparse
import json
import time

import benchlib  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np

from tlearn.jobs.audit_dups import similar_pairs, unit_rows


def vectors(n: int, dim: int, planted: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.choice(n - planted, planted, replace=False)
    X[n - planted :] = X[src] + 0.5 * rng.normal(size=(planted, dim)).astype(np.float32)
    return unit_rows(X)


def blocked(Z: np.ndarray, t: float) -> set:
    i, j, _, _ = similar_pairs(Z, t)
    return set(zip(i.tolist(), j.tolist(), strict=True))


def faiss_range(Z: np.ndarray, t: float) -> set:
    import faiss

    index = faiss.IndexFlatIP(Z.shape[1])
    index.add(Z)
    lims, _, ids = index.range_search(Z, t)
    out = set()
    for q in range(len(Z)):
        for j in ids[lims[q] : lims[q + 1]].tolist():
            if j > q:
                out.add((q, j))
    return out


def usearch_knn(Z: np.ndarray, t: float, k: int = 10) -> set:
    from usearch.index import Index

    index = Index(ndim=Z.shape[1], metric="cos", dtype="f32")
    index.add(np.arange(len(Z)), Z)
    found = index.search(Z, k)
    out = set()
    for q in range(len(Z)):
        for j, d in zip(found.keys[q].tolist(), found.distances[q].tolist(), strict=True):
            if j > q and 1 - d >= t:
                out.add((q, int(j)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--planted", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=0.83)
    args = ap.parse_args()
    Z = vectors(args.n, args.dim, args.planted)
    results = {}
    truth = None
    for name, fn in (("blocked", blocked), ("faiss", faiss_range), ("usearch", usearch_knn)):
        try:
            t0 = time.perf_counter()
            got = fn(Z, args.threshold)
            seconds = time.perf_counter() - t0
        except ImportError:
            results[name] = "not installed"
            continue
        truth = got if truth is None else truth
        results[name] = {
            "seconds": round(seconds, 2),
            "pairs": len(got),
            "recall": round(len(got & truth) / max(1, len(truth)), 4),
        }
    base = results["blocked"]["seconds"]
    for r in results.values():
        if isinstance(r, dict):
            r["time_vs_blocked"] = round(r["seconds"] / base, 2)
    print(json.dumps({"n": args.n, "dim": args.dim, **results, "machine": benchlib.machine()}))


if __name__ == "__main__":
    main()
