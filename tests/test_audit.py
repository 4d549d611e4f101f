"""tlearn audit: duplicates (exact, near, leakage first), label issues from out-of-fold
probabilities, outliers, class balance, unreadable files; the report files; features
from the cache on a second run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_COLORS, TINY, draw, make_dataset

from tlearn.cli.app import app
from tlearn.jobs.audit_dups import find_duplicates, similar_pairs, unit_rows
from tlearn.jobs.audit_labels import knn_distances, label_issues, out_of_fold, outliers

# ----------------------------------------------------------------------------- duplicates


def test_blocked_search_finds_exactly_the_pairs_above_the_threshold():
    rng = np.random.default_rng(0)
    Z = unit_rows(rng.normal(size=(50, 8)) + 0.8)
    S = Z @ Z.T
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if S[i, j] >= 0.8}
    assert 10 < len(want) < 400
    for block in (1, 7, 50, 4096):  # block edges must not lose or double pairs
        i, j, s, truncated = similar_pairs(Z, 0.8, block=block)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == want and not truncated
        assert np.all(np.diff(s) <= 1e-6)  # most similar first
    i, j, s, truncated = similar_pairs(Z, 0.8, block=7, limit=5)
    assert len(i) == 5 and truncated
    np.testing.assert_allclose(s, np.sort(S[np.triu_indices(50, 1)])[::-1][:5], rtol=1e-5)


def test_known_duplicate_pairs_with_leakage_first():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 16)).astype(np.float32)
    X[5] = X[1] + 0.05 * rng.normal(size=16)  # a near copy of 1, within train
    X[9] = X[2] + 0.05 * rng.normal(size=16)  # a near copy of a train image in val
    X[10] = X[3]  # the same file twice (val and train)
    keys = [bytes([i]) * 32 for i in range(12)]
    keys[10] = keys[3]
    splits = ["train"] * 8 + ["val"] * 4
    pairs, truncated = find_duplicates(X, keys, splits, 0.95)
    assert not truncated
    got = [(p.a, p.b, p.kind) for p in pairs]
    assert got == [(3, 10, "exact"), (2, 9, "near"), (1, 5, "near")]
    assert pairs[0].similarity == 1.0 and 0.95 <= pairs[1].similarity < 1
    # a val image first in row order still lists the train image as `a`
    splits_rev = ["val"] * 4 + ["train"] * 8
    pairs, _ = find_duplicates(X, keys, splits_rev, 0.95)
    assert [(p.a, p.b) for p in pairs][:2] == [(10, 3), (9, 2)]


# ----------------------------------------------------------------------------- labels


def _blobs(n_per=30, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, dim) * 6
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(3), n_per)
    return X, y


def test_planted_label_flips_are_ranked_first_with_their_true_label():
    X, y = _blobs()
    noisy = y.copy()
    flips = {4: 1, 37: 2, 70: 0}
    for row, wrong in flips.items():
        noisy[row] = wrong
    oof = out_of_fold(X, noisy, ["a", "b", "c"], C=None, folds=5, seed=0)
    assert oof.n_folds == 5 and oof.probabilities.shape == (90, 3)
    np.testing.assert_allclose(oof.probabilities.sum(1), 1, atol=1e-6)
    issues = label_issues(noisy, oof)
    top = issues[:3]
    assert {i.row for i in top} == set(flips)
    assert all(i.confident for i in top)
    assert all(i.suggested == y[i.row] and i.given == flips[i.row] for i in top)
    assert all(i.given_probability < i.suggested_probability for i in top)
    assert [i.given_probability for i in issues] == sorted(
        i.given_probability for i in issues if i.confident
    ) + [i.given_probability for i in issues if not i.confident]


def test_too_small_classes_give_no_cv():
    X, y = _blobs(n_per=4)
    y[0] = 2
    y[1:4] = 0
    y[4] = 1  # class 1 keeps a single image... and the others many
    y[5:8] = 0
    assert out_of_fold(X[:8], y[:8], ["a", "b", "c"], C=None, folds=5, seed=0) is None


def test_a_far_image_is_the_first_outlier_of_its_class():
    X, y = _blobs(n_per=40)
    X[10] = -8.0  # class 0, nowhere near it
    folds = np.arange(len(y)) % 5
    d = knn_distances(X, y, folds, k=5)
    assert np.isfinite(d).all()
    found = outliers(y, d)
    assert found and found[0].row == 10 and found[0].excess > 3


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def audit_data(tmp_path) -> Path:
    """DATA/train + DATA/val with an exact copy across them, a flipped label and a
    broken file."""
    root = tmp_path / "data"
    make_dataset(root / "train", classes=("asphalt", "grass"), n=8, seed=1)
    make_dataset(root / "val", classes=("asphalt", "grass"), n=4, seed=2)
    shutil.copy(root / "train/grass/grass_00.jpg", root / "val/grass/copy_of_grass_00.jpg")
    draw(root / "train/asphalt/really_grass.png", CLASS_COLORS["grass"], seed=99)
    (root / "train/grass/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_audit_writes_the_report_and_a_second_run_computes_nothing(audit_data, tmp_path, runner):
    report = tmp_path / "report"
    args = ["audit", str(audit_data), "-o", str(report), "--json", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n_images"] == 26 and doc["classes"] == ["asphalt", "grass"]
    assert doc["engine"]["computed"] == 25  # the copy's features: from the cache
    assert doc["class_balance"][0] == {"class": "asphalt", "train": 9, "val": 4, "share": 0.5}
    assert [u["path"] for u in doc["unreadable"]] == [str(audit_data / "train/grass/broken.jpg")]
    d = doc["duplicates"]
    assert d["exact"] == 1 and d["leakage"] >= 1 and d["threshold"] == 0.83
    first = d["first"][0]
    assert first["leak"] and first["kind"] == "exact" and first["similarity"] == 1.0
    assert first["path_a"].endswith("train/grass/grass_00.jpg")
    assert first["path_b"].endswith("val/grass/copy_of_grass_00.jpg")
    for name in ("duplicates.csv", "label_issues.csv", "outliers.csv", "class_balance.csv"):
        assert (report / name).is_file()
    for name in ("duplicates.png", "label_issues.png", "outliers.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "audit.json").read_text())["n_images"] == 26
    assert "broken.jpg" in (report / "skipped.csv").read_text()
    dups = _rows(report / "duplicates.csv")
    assert dups[0]["leak"] == "True" and float(dups[0]["similarity"]) == 1.0
    issues = _rows(report / "label_issues.csv")
    assert issues[0]["path"].endswith("really_grass.png")
    assert (issues[0]["given"], issues[0]["suggested"]) == ("asphalt", "grass")
    assert issues[0]["rank"] == "1" and issues[0]["confident_learning"] in ("yes", "no")
    assert "leakage: duplicates across train/val" in result.stderr
    assert "likely label errors" in result.stderr

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    engine = json.loads(again.stdout)["engine"]
    assert engine["computed"] == 0 and engine["cached"] == 26


def test_audit_with_a_separate_val_folder(tmp_path, runner):
    train, val = tmp_path / "train", tmp_path / "val"
    make_dataset(train, classes=("asphalt", "grass"), n=6, seed=3)
    make_dataset(val, classes=("asphalt", "grass"), n=3, seed=4)
    shutil.copy(train / "asphalt/asphalt_01.png", val / "asphalt/again.png")
    report = tmp_path / "r"
    result = runner.invoke(
        app, ["audit", str(train), "--val", str(val), "-o", str(report), "--json", "-q", *TINY]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["duplicates"]["leakage"] >= 1
    assert doc["class_balance"][1]["val"] == 3
    assert result.stderr.strip() == ""  # --quiet


def test_audit_with_a_class_too_small_to_cross_validate(tmp_path, runner):
    data = tmp_path / "d"
    make_dataset(data, classes=("asphalt", "grass"), n=4)
    for p in list((data / "grass").iterdir())[1:]:
        p.unlink()
    result = runner.invoke(app, ["audit", str(data), "-o", str(tmp_path / "r"), "--json", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label_issues"]["count"] == 0
    assert "fewer than two images" in result.stderr


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--threshold", "0"], 2, "--threshold 0.0: a cosine similarity in (0, 1]"),
        (["--threshold", "1.5"], 2, "--threshold 1.5"),
        (["--folds", "1"], 2, "--folds 1: must be at least 2"),
        (["--neighbours", "0"], 2, "--neighbours 0: must be at least 1"),
        (["--max-pairs", "0"], 2, "--max-pairs 0"),
        (["--C", "-1"], 2, "--C -1"),
        (["--layer", "auto"], 2, "not --layer auto"),
        (["--val", "VAL"], 2, "has train/ and val/ folders already"),
    ],
)
def test_audit_refuses_bad_options(extra, code, message, split_folder, tmp_path, runner):
    extra = [str(split_folder / "val") if a == "VAL" else a for a in extra]
    out = tmp_path / "r"
    result = runner.invoke(app, ["audit", str(split_folder), "-o", str(out), *extra, *TINY])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_audit_of_a_missing_folder(tmp_path, runner):
    result = runner.invoke(app, ["audit", str(tmp_path / "nope"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "is not a folder of class sub-folders" in result.output
