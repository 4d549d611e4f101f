"""The feature cache: hits skip the backbone, content changes are never served stale,
skipped images are not cached, writes are atomic, `tlearn cache info|clear`."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tlearn.runtime.export as rt
from tests.conftest import TINY, make_dataset
from tlearn.backbone.cut import feature_network
from tlearn.backbone.weights import load_backbone
from tlearn.cache.admin import cache_info
from tlearn.cache.store import FeatureStore, cache_root, compact, hash_files, shard_names
from tlearn.cli.app import app
from tlearn.core.hashing import content_key, file_key
from tlearn.core.options import RunOptions
from tlearn.features.engine import Engine
from tlearn.features.table import read_features_csv
from tlearn.runtime.ort import LazyRuntime


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny():
    backbone = load_backbone("test_efficientnet", "none")
    net, spec = feature_network(backbone, None, "avg")
    return net, spec, backbone.data_config


def _extract(net, spec, cfg, paths, *, cache=True, draft=True):
    """An engine on `net` with the torch backend (its runtime opened through
    runtime.export.open_runtime, which _no_backbone refuses)."""
    import torch

    cpu = torch.device("cpu")
    runtime = LazyRuntime(
        lambda: rt.open_runtime(net, spec, cfg, backend="torch", device=cpu, cache_root=None), cpu
    )
    root = cache_root() if cache else None
    engine = Engine(spec, cfg, runtime, root, draft=draft, precision="fp32", notes=[])
    feats = engine.extract(paths, RunOptions(workers=0, batch_size=4), stage="extract")
    return feats, engine.summary()


def _no_backbone(monkeypatch):
    """Make any attempt to open a backend fail: what follows must come from the cache."""

    def refuse(*a, **k):
        raise AssertionError("the backbone ran although every image was cached")

    monkeypatch.setattr(rt, "open_runtime", refuse)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("TLEARN_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "tlearn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tlearn"


def test_second_run_is_served_from_the_cache(cache_dir, image_folder, tiny, monkeypatch):
    import tlearn.data.decode as decode_module
    import tlearn.features.stream as stream_module

    net, spec, cfg = tiny
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))
    first, s1 = _extract(net, spec, cfg, paths)
    assert s1["computed"] == len(paths) and s1["cached"] == 0
    _no_backbone(monkeypatch)

    def no_workers(*a, **k):
        raise AssertionError("a fully cached run needs no decoding workers")

    # both ways images get decoded: plain worker processes and torch's DataLoader
    monkeypatch.setattr(decode_module, "decoded_batches", no_workers)
    monkeypatch.setattr(stream_module, "torch_batches", no_workers)
    second, s2 = _extract(net, spec, cfg, paths)
    stages = s2.pop("stages")
    assert s2 == {
        "backend": None,
        "device": "cpu",
        "cached": len(paths),
        "computed": 0,
        "decode": "cpu",
    }
    assert set(stages) == {"cache reads"}  # nothing decoded, computed or written
    np.testing.assert_array_equal(second.X, first.X)
    assert second.indices.tolist() == list(range(len(paths)))


def test_partly_cached_batches_keep_input_order(cache_dir, image_folder, tiny):
    net, spec, cfg = tiny
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))[:10]
    fresh, _ = _extract(net, spec, cfg, paths, cache=False)
    _extract(net, spec, cfg, paths[::3])  # every third image cached
    mixed, s = _extract(net, spec, cfg, paths)
    assert s["cached"] == len(paths[::3]) and s["computed"] == len(paths) - len(paths[::3])
    assert mixed.indices.tolist() == list(range(len(paths)))
    np.testing.assert_allclose(mixed.X, fresh.X, rtol=0, atol=1e-6)


def test_changed_content_with_same_size_and_mtime_is_recomputed(cache_dir, tmp_path, tiny):
    """The key is the file's bytes: an edit that keeps size and mtime is still seen."""
    net, spec, cfg = tiny
    path = tmp_path / "img.bmp"  # BMP: file size depends only on the image size
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    st = os.stat(path)
    before, _ = _extract(net, spec, cfg, [str(path)])
    Image.new("RGB", (40, 30), (30, 30, 200)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    after, s = _extract(net, spec, cfg, [str(path)])
    assert s["computed"] == 1 and s["cached"] == 0
    fresh, _ = _extract(net, spec, cfg, [str(path)], cache=False)
    np.testing.assert_array_equal(after.X, fresh.X)
    assert not np.allclose(after.X, before.X)


def test_moved_and_renamed_images_still_hit(cache_dir, tmp_path, tiny, monkeypatch):
    net, spec, cfg = tiny
    src = make_dataset(tmp_path / "a", n=2)
    first, _ = _extract(net, spec, cfg, [str(p) for p in src])
    moved = []
    for i, p in enumerate(src):
        dst = tmp_path / "b" / f"renamed_{i}{p.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dst)
        moved.append(str(dst))
    _no_backbone(monkeypatch)
    second, s = _extract(net, spec, cfg, moved)
    assert s["cached"] == len(moved)
    np.testing.assert_array_equal(second.X, first.X)


def test_other_cut_or_preprocessing_does_not_share_entries(cache_dir, image_folder, tiny):
    net, spec, cfg = tiny
    paths = sorted(str(p) for p in (image_folder / "grass").iterdir())
    _extract(net, spec, cfg, paths)
    backbone = load_backbone("test_efficientnet", "none")
    net2, spec2 = feature_network(backbone, "blocks.1", "max")
    feats, s = _extract(net2, spec2, cfg, paths)
    assert s["computed"] == len(paths) and feats.X.shape[1] != 256
    _, s = _extract(net, spec, cfg, paths, draft=False)  # other decoding: other entries
    assert s["computed"] == len(paths)
    cfg2 = {**cfg, "crop_pct": cfg["crop_pct"] - 0.1}
    _, s = _extract(net, spec, cfg2, paths)
    assert s["computed"] == len(paths)
    assert len(cache_info().cuts) == 4


def test_unreadable_images_are_skipped_every_time_and_never_cached(cache_dir, tmp_path, tiny):
    net, spec, cfg = tiny
    good = make_dataset(tmp_path / "d", n=2)
    bad = tmp_path / "d" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(p) for p in good] + [str(bad)]
    for _ in range(2):
        feats, _ = _extract(net, spec, cfg, paths)
        assert [s.path for s in feats.skipped] == [str(bad)]
        assert len(feats.X) == len(good)
    (info,) = cache_info().cuts
    assert info.images == len(good)


def test_no_cache_reads_and_writes_no_features(cache_dir, image_folder, runner, tmp_path):
    """--no-cache is about features: the exported graph is still cached (warm start-up)."""
    out = tmp_path / "f.csv"
    args = ["extract", str(image_folder), "-o", str(out), "-q", "--no-cache", *TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert not (cache_dir / "features").exists()
    assert list((cache_dir / "onnx").glob("*.onnx"))
    r = runner.invoke(app, [*args[:3], str(tmp_path / "g.csv"), *args[4:]])
    assert r.exit_code == 0, r.output
    assert not (cache_dir / "features").exists()
    assert (tmp_path / "g.csv").read_bytes() == out.read_bytes()


def test_fit_again_with_another_C_and_evaluate_do_not_run_the_backbone(
    cache_dir, split_folder, runner, tmp_path, monkeypatch
):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    r = runner.invoke(app, ["fit", str(split_folder), "-o", str(m1), "--C", "1", "-q", *TINY])
    assert r.exit_code == 0, r.output
    _no_backbone(monkeypatch)
    r = runner.invoke(app, ["fit", str(split_folder), "-o", str(m2), "--C", "0.01", "-q", *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(m2), str(split_folder / "val"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 9
    r = runner.invoke(app, ["predict", str(m2), str(split_folder / "val" / "grass"), "-q"])
    assert r.exit_code == 0, r.output


def test_extract_reports_cache_use(cache_dir, image_folder, runner, tmp_path):
    out = tmp_path / "f.csv"
    args = ["extract", str(image_folder), "-o", str(out), *TINY]
    assert "18 computed" in runner.invoke(app, args).output
    r = runner.invoke(app, args)
    assert "all 18 from the feature cache" in r.output
    assert len(read_features_csv(out).paths) == 18


def test_store_ignores_incomplete_and_damaged_shards(cache_dir, tiny):
    net, spec, cfg = tiny
    store = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    keys = [content_key(bytes([i])) for i in range(3)]
    X = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    store.put(keys, X)
    store.close()
    folder = store.folder
    # a writer killed between its two files: features without keys are invisible
    np.save(folder / "dead.feats.npy", np.ones((2, 4), np.float32))
    # a damaged keys file and a shard whose lengths disagree are ignored
    (folder / "junk.keys.npy").write_bytes(b"garbage")
    np.save(folder / "junk.feats.npy", np.ones((1, 4), np.float32))
    np.save(folder / "short.keys.npy", np.zeros((5, 32), np.uint8))
    np.save(folder / "short.feats.npy", np.ones((1, 4), np.float32))
    again = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    assert len(again.known) == 3
    np.testing.assert_array_equal(again.get(keys[::-1]), X[::-1])
    assert content_key(b"other") not in again.known


def test_concurrent_writers_and_compaction(cache_dir, tiny):
    net, spec, cfg = tiny
    rng = np.random.default_rng(0)
    keys = [content_key(i.to_bytes(4, "little")) for i in range(80)]
    X = rng.normal(size=(80, 8)).astype(np.float32)
    # two runs that opened the store at the same time, writing overlapping keys
    a = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    b = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    a.put(keys[:50], X[:50])
    b.put(keys[30:], X[30:])
    a.close()
    b.close()
    # many small shards (e.g. one `predict` per image) are merged
    for i in range(0, 80, 10):
        s = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
        s.put(keys[i : i + 10], X[i : i + 10])
        s.flush()
    reader = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    assert len(shard_names(a.folder)) == 10
    assert compact(a.folder, max_shards=4) == 10
    assert len(shard_names(a.folder)) == 1
    # a run that opened the store before the merge still reads the deleted shards
    np.testing.assert_array_equal(reader.get(keys), X)
    final = FeatureStore.open(cache_dir, spec, cfg, draft=True, precision="fp32")
    np.testing.assert_array_equal(final.get(keys), X)
    assert not list(a.folder.glob("*.tmp"))


def test_cache_write_failure_is_a_note_not_an_error(tmp_path, image_folder, runner, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(blocker))
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert "feature cache not written" in r.output
    assert len(read_features_csv(out).paths) == 18


def test_cache_info_and_clear(cache_dir, image_folder, runner, tmp_path):
    r = runner.invoke(app, ["cache", "info", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["cuts"] == []
    out = tmp_path / "f.csv"
    runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "-q", *TINY])
    runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "-q", "-l", "1", *TINY])
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert info["root"] == str(cache_dir)
    assert sorted(c["layers"][0] for c in info["cuts"]) == ["blocks.1", "final"]
    assert all(c["images"] == 18 and c["model"] == "test_efficientnet" for c in info["cuts"])
    assert info["onnx_models"] == 2
    r = runner.invoke(app, ["cache", "info"])
    assert "test_efficientnet" in r.stdout and "36 cached feature vectors" in r.stdout
    unrelated = cache_dir / "keep-me.txt"
    unrelated.write_text("not ours")
    assert list((cache_dir / "resolved").glob("*.json"))  # what warm runs need (tlearn.warm)
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and "freed" in r.output
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert info["cuts"] == [] and info["onnx_models"] == 0
    assert not (cache_dir / "resolved").exists()
    assert unrelated.exists()


def test_hash_files_marks_unreadable_entries(tmp_path):
    files = [tmp_path / f"f{i}.bin" for i in range(70)]  # enough to use the thread pool
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (i + 1))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()
    os.mkfifo(tmp_path / "fifo.jpg")  # must not be opened: that would block
    paths = [str(f) for f in files] + [
        str(tmp_path / n) for n in ("empty.jpg", "dir.jpg", "fifo.jpg", "missing.jpg")
    ]
    keys = hash_files(paths)
    assert keys[:70] == [file_key(f) for f in files]
    assert len(set(keys[:70])) == 70
    assert keys[70:] == [None] * 4


@pytest.mark.parametrize("workers", [1, 3])
def test_csv_written_by_worker_processes_is_byte_identical(
    image_folder, tmp_path, runner, monkeypatch, workers
):
    """On machines with cores to spare the CSV text is made in worker processes while
    extraction goes on: same bytes, same row order, as writing it in the main process."""
    import tlearn.features.formats.csv_format as table

    assert table.csv_workers(2) == 0 and table.csv_workers(16) == 4
    first = sorted((image_folder / "grass").iterdir())[0]
    shutil.copy(first, image_folder / "grass" / 'odd, "quoted"\nname.png')  # CSV quoting
    (image_folder / "grass" / "broken.jpg").write_bytes(b"not an image")  # a skipped one
    out = {}
    for n in (0, workers):
        monkeypatch.setattr(table, "csv_workers", lambda n=n: n)
        csv = tmp_path / f"w{n}.csv"
        args = ["extract", str(image_folder), "-o", str(csv), "-b", "4", "-q", *TINY]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        out[n] = csv.read_bytes()
    assert out[0] == out[workers]
    assert len(pd.read_csv(io.BytesIO(out[0]))) == 19  # 18 images + the odd name, not broken
