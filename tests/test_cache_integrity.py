"""Damaged cache files are never served: feature shards, cached ONNX graphs and the
remembered preprocessing JSON carry checksums; a mismatch is discarded, recomputed, and
a note says so. `tlearn cache clear` deletes only what tlearn wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY
from tlearn.cache.store import SUM, FeatureStore, shard_names
from tlearn.cli.app import app
from tlearn.core.hashing import content_key
from tlearn.core.spec import CutSpec

CFG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.875,
}
SPEC = CutSpec("test_efficientnet", "none", None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(d))
    return d


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 3 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _store(cache_dir):
    return FeatureStore.open(cache_dir, SPEC, CFG, draft=True, precision="fp32")


def _filled(cache_dir):
    keys = [content_key(bytes([i])) for i in range(5)]
    X = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    store = _store(cache_dir)
    store.put(keys, X)
    store.close()
    return store.folder, keys, X


@pytest.mark.parametrize("part", ["feats", "keys"])
def test_a_damaged_shard_is_discarded_with_a_note(cache_dir, part):
    folder, keys, X = _filled(cache_dir)
    (name,) = shard_names(folder)
    _flip(folder / f"{name}.{part}.npy")
    store = _store(cache_dir)
    assert not store.hits(keys).any()  # nothing of the damaged shard is served
    assert any("damaged" in n and name in n for n in store.notes), store.notes
    assert shard_names(folder) == []
    with pytest.raises(KeyError):
        store.get(keys[:1])
    # recomputed features are written again and served from then on
    store.put(keys, X)
    store.close()
    again = _store(cache_dir)
    assert again.hits(keys).all()
    np.testing.assert_array_equal(again.get(keys), X)
    assert again.notes == []


def test_intact_shards_are_served(cache_dir):
    folder, keys, X = _filled(cache_dir)
    assert json.loads((folder / f"{shard_names(folder)[0]}{SUM}").read_text()).keys() == {
        "feats",
        "keys",
    }
    store = _store(cache_dir)
    np.testing.assert_array_equal(store.get(keys[::-1]), X[::-1])


def _extract(runner, data, out, *extra):
    r = runner.invoke(app, ["extract", str(data), "-o", str(out), *TINY, *extra])
    assert r.exit_code == 0, r.output
    return r


def _damage_graph(cache: Path) -> None:
    (graph,) = sorted((cache / "onnx").glob("*.onnx"))
    _flip(graph, len(graph.read_bytes()) // 2)


def _damage_pixels(cache: Path) -> None:
    (path,) = sorted((cache / "resolved").glob("pixels-*.json"))
    doc = json.loads(path.read_text())
    doc["doc"]["mean"] = [9.0, 9.0, 9.0]  # valid JSON, wrong values: only the checksum tells
    path.write_text(json.dumps(doc))


def _damage_cut(cache: Path) -> None:
    (path,) = sorted((cache / "resolved").glob("cut-*.json"))
    doc = json.loads(path.read_text())
    doc["doc"]["spec"]["pool"] = "max"
    path.write_text(json.dumps(doc))


def _damage_shard(cache: Path) -> None:
    (folder,) = [p for p in (cache / "features").iterdir() if p.is_dir()]
    for name in shard_names(folder):
        _flip(folder / f"{name}.feats.npy")


@pytest.mark.parametrize(
    "damage, note, extra",
    [
        (_damage_shard, "feature cache: shard", []),
        (_damage_graph, "cached ONNX graph", ["--no-cache"]),
        (_damage_pixels, "was damaged (checksum", ["--no-cache"]),
        (_damage_cut, "was damaged (checksum", ["--no-cache"]),
    ],
)
def test_damaged_cache_files_are_recomputed_not_served(
    runner, image_folder, tmp_path, cache_dir, damage, note, extra
):
    first = tmp_path / "first.csv"
    _extract(runner, image_folder, first)
    _extract(runner, image_folder, tmp_path / "warm.csv")  # the warm path is set up
    damage(cache_dir)
    again = tmp_path / "again.csv"
    r = _extract(runner, image_folder, again, *extra)
    assert note in r.output
    assert again.read_bytes() == first.read_bytes()
    # the damaged file was replaced: the next run is clean
    r = _extract(runner, image_folder, tmp_path / "third.csv", *extra)
    assert note not in r.output
    assert (tmp_path / "third.csv").read_bytes() == first.read_bytes()


def test_cache_clear_refuses_a_folder_tlearn_did_not_make(runner, tmp_path, monkeypatch):
    home = tmp_path / "home"
    for rel in ("features/thesis.tex", "onnx/model.onnx", "resolved/keep.json", "notes.txt"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("mine")
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(home))
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 2, r.output
    assert "CACHEDIR.TAG" in r.stderr and "nothing was deleted" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == [
        "keep.json",
        "model.onnx",
        "notes.txt",
        "thesis.tex",
    ]


def test_cache_clear_clears_a_cache_tlearn_made(runner, image_folder, tmp_path, cache_dir):
    _extract(runner, image_folder, tmp_path / "a.csv")
    assert (cache_dir / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172")
    (cache_dir / "mine.txt").write_text("a file of the user's beside the cache")
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in cache_dir.iterdir()) == ["CACHEDIR.TAG", "mine.txt"]


def test_the_default_cache_root_is_tlearns_by_its_name(runner, tmp_path, monkeypatch):
    monkeypatch.delenv("TLEARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    old = tmp_path / "tlearn" / "features" / "abc"
    old.mkdir(parents=True)  # a cache from before markers
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "tlearn" / "features").exists()
