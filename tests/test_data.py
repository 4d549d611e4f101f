from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import imagegen as gen
from tests.imagegen import BLUE, GREEN, RED, WHITE, YELLOW
from tlearn.core.errors import DataError, ImageLoadError
from tlearn.data.image import load_image
from tlearn.data.imageset import ImageSet, Skipped, is_image_name
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset, scan_class_folders, scan_inputs


def assert_color(img: Image.Image, xy, expected, tol=12):
    got = img.getpixel(xy)
    assert all(abs(g - e) <= tol for g, e in zip(got, expected, strict=True)), (xy, got, expected)


# --- load_image: readable images --------------------------------------------------------------

ALPHA_50_RED = tuple(round(c * 128 / 255 + 255 * (1 - 128 / 255)) for c in RED)


@pytest.mark.parametrize(
    "name, build, expected",
    [
        ("gray.png", lambda p: gen.make_gray(p, value=100), (100, 100, 100)),
        ("gray.jpg", lambda p: gen.make_gray(p, value=100), (100, 100, 100)),
        ("onebit.png", lambda p: gen.make_gray(p, value=1, mode="1"), WHITE),
        ("cmyk.jpg", gen.make_cmyk_jpeg, (255, 0, 0)),
        ("rgba.png", gen.make_rgba, ALPHA_50_RED),
        ("g16.png", gen.make_high_depth, (128, 128, 128)),
        ("g16.tif", gen.make_high_depth, (128, 128, 128)),
        ("g16-white.png", lambda p: gen.make_high_depth(p, value=65535), WHITE),
        ("g16-dark.tif", lambda p: gen.make_high_depth(p, value=257), (1, 1, 1)),
        ("i32.tif", lambda p: gen.make_high_depth(p, dtype=np.int32), (128, 128, 128)),
        ("i32-8bit.tif", lambda p: gen.make_high_depth(p, value=200, dtype=np.int32), (200,) * 3),
        ("float.tif", lambda p: gen.make_high_depth(p, value=0.5, dtype=np.float32), (128,) * 3),
        ("rgb16.png", gen.make_rgb16_png, (128, 128, 128)),
        ("anim.gif", gen.make_animated_gif, RED),
        ("png-named.jpg", lambda p: gen.make_rgb(p, format="PNG"), RED),
        ("gif-named.jpg", lambda p: gen.make_rgb(p, format="GIF"), RED),
        ("UPPER.JPG", gen.make_rgb, RED),
        ("Mixed.WebP", lambda p: gen.make_rgb(p, lossless=True), RED),
        ("plain.bmp", gen.make_rgb, RED),
        ("plain.tiff", gen.make_rgb, RED),
        *[(name, gen.make_rgb, RED) for name in gen.ODD_NAMES],
    ],
)
def test_load_image_reads_modes_and_formats_as_rgb(tmp_path, name, build, expected):
    path = build(tmp_path / name)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    assert_color(img, (20, 15), expected)


@pytest.mark.parametrize(
    "name, mode", [("rgba.png", "RGBA"), ("la.png", "LA"), ("p.png", "P"), ("p.gif", "P")]
)
def test_transparent_pixels_become_white_not_black(tmp_path, name, mode):
    path = gen.make_half_transparent(tmp_path / name, mode=mode)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((5, 15)) == WHITE  # transparent half; stored black underneath
    expected = RED if mode != "LA" else (RED[0],) * 3
    assert_color(img, (30, 15), expected, tol=0)


def test_16_bit_gradient_keeps_its_range(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256)).save(path)
    row = np.asarray(load_image(path))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0)  # monotonic, no clipping to white
    assert 120 <= row[128] <= 135


def test_32_bit_values_beyond_16_bit_are_stretched_not_clipped(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 500_000, 1_000_000]], dtype=np.int32)).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


# Colour at the centre of each quadrant after loading: (top-left, top-right, bottom-left,
# bottom-right), for an image stored as gen.QUADRANTS with the given EXIF orientation.
ORIENTED = {
    1: ((40, 20), (RED, GREEN, BLUE, YELLOW)),
    3: ((40, 20), (YELLOW, BLUE, GREEN, RED)),
    6: ((20, 40), (BLUE, RED, YELLOW, GREEN)),  # stored rotated 90 degrees counter-clockwise
    8: ((20, 40), (GREEN, YELLOW, RED, BLUE)),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = gen.make_quadrants(tmp_path / "rot.jpg", size=(40, 20), orientation=orientation)
    img = load_image(path)
    size, colors = ORIENTED[orientation]
    assert img.size == size
    w, h = size
    centres = [(x * w // 4, y * h // 4) for y in (1, 3) for x in (1, 3)]  # TL, TR, BL, BR
    for xy, color in zip(centres, colors, strict=True):
        assert_color(img, xy, color, tol=30)


@pytest.mark.parametrize(
    "min_size, expected",
    [
        (100, (200, 150)),
        (150, (200, 150)),
        (300, (400, 300)),
        (301, (800, 600)),
        (5000, (800, 600)),
    ],
)
def test_min_size_lets_jpeg_decode_smaller_but_never_below(tmp_path, min_size, expected):
    path = gen.make_rgb(tmp_path / "big.jpg", size=(800, 600))
    img = load_image(path, min_size=min_size)
    assert img.size == expected
    assert min(img.size) >= min(min_size, 600)
    assert_color(img, (img.width // 2, img.height // 2), RED)


def test_min_size_with_exif_rotation_keeps_both_sides(tmp_path):
    path = gen.make_quadrants(tmp_path / "rot.jpg", size=(800, 400), orientation=6)
    img = load_image(path, min_size=100)
    assert img.size == (100, 200)  # decoded at 1/4, then rotated
    assert_color(img, (75, 50), RED, tol=30)


def test_min_size_does_not_touch_other_formats(tmp_path):
    path = gen.make_rgb(tmp_path / "big.png", size=(800, 600))
    assert load_image(path, min_size=100).size == (800, 600)


@pytest.mark.parametrize(
    "name, size",
    [("dot.png", (1, 1)), ("dot.jpg", (1, 1)), ("tall.jpg", (1, 500)), ("wide.png", (500, 1))],
)
@pytest.mark.parametrize("min_size", [None, 224])
def test_tiny_and_extreme_aspect_images(tmp_path, name, size, min_size):
    path = gen.make_rgb(tmp_path / name, size=size)
    img = load_image(path, min_size=min_size)
    assert img.size == size
    assert_color(img, (0, 0), RED)


def test_returned_image_outlives_its_file(tmp_path):
    path = gen.make_rgb(tmp_path / "a.png")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == RED


def test_min_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        load_image(gen.make_rgb(tmp_path / "a.jpg"), min_size=0)


# --- load_image: broken files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, build, reason",
    [
        ("cut.jpg", gen.make_truncated, "truncated or corrupt image (OSError"),
        ("cut.png", lambda p: gen.make_truncated(p, format="PNG"), "truncated or corrupt image"),
        ("empty.jpg", gen.make_zero_byte, "zero-byte file"),
        ("text.jpg", gen.make_text_file, "not a recognised image format"),
        ("noise.png", gen.make_random_bytes, "not a recognised image format"),
        ("broken.jpg", gen.make_broken_symlink, "broken symlink"),
        ("folder.jpg", gen.make_dir_named_like_image, "is a directory"),
        ("missing.jpg", lambda p: p, "file not found"),
    ],
)
def test_broken_files_raise_image_load_error(tmp_path, name, build, reason):
    path = build(tmp_path / name)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert isinstance(info.value, DataError)  # the CLI's one-line handling applies


# 40x30 = 1200 pixels: over a limit of 1000 only warns in Pillow, over 2 * 100 it raises.
@pytest.mark.parametrize("limit", [1000, 100])
def test_decompression_bomb_is_a_failure_and_filters_are_restored(tmp_path, monkeypatch, limit):
    path = gen.make_rgb(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)
    assert warnings.filters == filters_before
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (40, 30)


# --- names and ImageSet -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.jpg", True),
        ("A.JPEG", True),
        ("x.PnG", True),
        ("dir/b.webp", True),
        ("c.tif", True),
        ("c.tiff", True),
        ("c.bmp", True),
        ("c.gif", True),
        (".DS_Store", False),
        ("._a.jpg", False),
        (".hidden.png", False),
        ("notes.txt", False),
        ("labels.csv", False),
        ("jpg", False),
        ("archive.jpg.zip", False),
    ],
)
def test_is_image_name(name, expected):
    assert is_image_name(name) is expected


def test_image_set_subset_and_label_names():
    images = ImageSet(
        ["a", "b", "c"], [0, 1, 0], ["cat", "dog"], [Skipped("z", "zero-byte file")], ["w"]
    )
    sub = images.subset([2, 1])
    assert (sub.paths, sub.labels, sub.classes) == (["c", "b"], [0, 1], ["cat", "dog"])
    assert sub.label_names == ["cat", "dog"]
    assert (sub.skipped, sub.warnings, len(sub)) == (images.skipped, ["w"], 2)
    sub.warnings.append("only in the subset")
    assert images.warnings == ["w"]
    unlabeled = ImageSet(["a", "b"], None, [])
    assert unlabeled.subset([1]).labels is None
    assert unlabeled.label_names == [None, None]


def test_image_set_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        ImageSet(["a", "b"], [0], ["cat"])


# --- scan_class_folders / resolve_dataset -----------------------------------------------------


def test_scan_messy_folder(tmp_path):
    expected = gen.make_messy_folder(tmp_path)
    images = scan_class_folders(tmp_path)
    assert images.classes == expected["classes"]
    assert images.paths == expected["images"]["cat"] + expected["images"]["dog"]
    assert images.label_names == ["cat"] * 5 + ["dog"] * 5
    assert {s.path: s.reason for s in images.skipped} == expected["skipped"]
    assert images.warnings == ["class 'empty' has no images; left out"]
    reported = set(images.paths) | {s.path for s in images.skipped}
    assert reported.isdisjoint(expected["ignored"])


def test_messy_folder_unreadable_files_fail_only_at_load(tmp_path):
    expected = gen.make_messy_folder(tmp_path)
    for path, reason in expected["unreadable"].items():
        with pytest.raises(ImageLoadError, match=reason):
            load_image(path)
    readable = [p for p in scan_class_folders(tmp_path).paths if p not in expected["unreadable"]]
    assert all(load_image(p).mode == "RGB" for p in readable)


def test_scan_order_is_sorted_and_deterministic(tmp_path):
    for name in ["b.png", "C.png", "a.png", "sub/z.png", "a b.png"]:
        gen.make_rgb(tmp_path / "k" / name)
    gen.make_rgb(tmp_path / "j" / "x.png")
    first = scan_class_folders(tmp_path)
    names = [os.path.relpath(p, tmp_path) for p in first.paths]
    assert names == ["j/x.png", "k/C.png", "k/a b.png", "k/a.png", "k/b.png", "k/sub/z.png"]
    assert first.labels == [0, 1, 1, 1, 1, 1]
    assert scan_class_folders(tmp_path) == first


def test_scan_with_given_classes_uses_their_order(tmp_path):
    gen.make_class_folders(tmp_path, {"cat": 2, "dog": 1})
    images = scan_class_folders(tmp_path, classes=["dog", "bird", "cat"])
    assert images.classes == ["dog", "bird", "cat"]
    assert images.label_names == ["dog", "cat", "cat"]
    assert images.labels == [0, 2, 2]
    assert images.warnings == [f"class 'bird' has no images in {tmp_path}"]


def test_scan_with_given_classes_rejects_unknown_folder(tmp_path):
    gen.make_class_folders(tmp_path, {"cat": 1, "fox": 1})
    gen.make_text_file(tmp_path / "empty-unknown" / "notes.txt")  # no images: not an error
    with pytest.raises(DataError, match=r"'fox'.*\(cat, dog\)"):
        scan_class_folders(tmp_path, classes=["cat", "dog"])


def test_loose_images_in_root_are_ignored_with_a_warning(tmp_path):
    gen.make_class_folders(tmp_path, {"cat": 1})
    gen.make_rgb(tmp_path / "stray.jpg")
    images = scan_class_folders(tmp_path)
    assert images.paths == [str(tmp_path / "cat" / "img_0.png")]
    assert "1 image file(s) directly in" in images.warnings[0]


def test_symlink_loop_does_not_hang(tmp_path):
    gen.make_class_folders(tmp_path, {"cat": 1})
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")
    assert len(scan_class_folders(tmp_path)) == 1


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "has no class folders"),
        (lambda root: gen.make_rgb(root / "loose.jpg"), "has no class folders"),
        (lambda root: gen.make_text_file(root / "cat" / "a.txt"), "no image files found"),
        (lambda root: gen.make_zero_byte(root / "cat" / "a.jpg"), "all 1 image"),
        (lambda root: root.rmdir(), "does not exist"),
    ],
)
def test_scan_class_folders_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    root.mkdir()
    setup(root)
    with pytest.raises(DataError, match=message):
        scan_class_folders(root)


def test_resolve_dataset_train_val(tmp_path):
    gen.make_class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    gen.make_class_folders(tmp_path / "val", {"dog": 1})
    train, val = resolve_dataset(tmp_path)
    assert train.classes == val.classes == ["cat", "dog"]
    assert val.label_names == ["dog"]
    assert val.labels == [1]
    assert val.warnings == [f"class 'cat' has no images in {tmp_path / 'val'}"]


def test_resolve_dataset_plain_folder(tmp_path):
    gen.make_class_folders(tmp_path, {"cat": 1, "dog": 1})
    train, val = resolve_dataset(tmp_path)
    assert val is None
    assert train.classes == ["cat", "dog"]


def test_resolve_dataset_val_class_not_in_train(tmp_path):
    gen.make_class_folders(tmp_path / "train", {"cat": 1, "dog": 1})
    gen.make_class_folders(tmp_path / "val", {"cat": 1, "fox": 1})
    with pytest.raises(DataError, match=r"'fox'.*val.*classes in .*train"):
        resolve_dataset(tmp_path)


@pytest.mark.parametrize("present, missing", [("train", "val"), ("val", "train")])
def test_resolve_dataset_lone_split_is_not_a_class(tmp_path, present, missing):
    gen.make_class_folders(tmp_path / present, {"cat": 1})
    gen.make_class_folders(tmp_path / "test", {"cat": 1})
    with pytest.raises(DataError, match=f"no {tmp_path / missing}"):
        resolve_dataset(tmp_path)


# --- read_labels_csv --------------------------------------------------------------------------


def write_csv(path: Path, rows, header=("path", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_labels_csv(tmp_path):
    a = gen.make_rgb(tmp_path / "imgs" / gen.ODD_NAMES[0])
    b = gen.make_rgb(tmp_path / "imgs" / "b.png")
    elsewhere = gen.make_rgb(tmp_path / "other" / "c.png")
    zero = gen.make_zero_byte(tmp_path / "imgs" / "zero.jpg")
    csv_path = write_csv(
        tmp_path / "labels.csv",
        [
            ["dog", "1", f"imgs/{a.name}"],
            ["cat", "2", "./imgs/b.png"],
            ["dog", "3", str(elsewhere)],
            ["cat", "4", "imgs/zero.jpg"],
        ],
        header=("Label", "score", " path"),  # any column order, case and padding
    )
    images = read_labels_csv(csv_path)
    assert images.paths == [str(a), str(b), str(elsewhere)]  # file order, resolved paths
    assert images.classes == ["cat", "dog"]
    assert images.label_names == ["dog", "cat", "dog"]
    assert images.skipped == [Skipped(str(zero), "zero-byte file")]
    assert images.warnings == []


def test_read_labels_csv_class_with_only_skipped_files_is_left_out(tmp_path):
    gen.make_rgb(tmp_path / "a.png")
    gen.make_zero_byte(tmp_path / "b.png")
    csv_path = write_csv(tmp_path / "labels.csv", [["a.png", "cat"], ["b.png", "dog"]])
    images = read_labels_csv(csv_path)
    assert images.classes == ["cat"]
    assert images.warnings == ["class 'dog' has no usable images; left out"]


def test_read_labels_csv_with_bom_blank_lines_and_given_classes(tmp_path):
    gen.make_rgb(tmp_path / "a.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes("\ufeffpath,label\r\n\r\na.png, cat \r\n".encode())
    images = read_labels_csv(csv_path, classes=["dog", "cat"])
    assert images.classes == ["dog", "cat"]
    assert images.labels == [1]
    assert images.warnings == [f"class 'dog' has no images in {csv_path}"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,class\na.png,cat\n", "line 1: expected a header"),
        ("a.png,cat\n", "line 1: expected a header"),
        ("", "line 1: expected a header"),
        ("path,label\na.png,cat\nb.png,\n", "line 3: empty label"),
        ("path,label\na.png,cat\n,dog\n", "line 3: empty path"),
        ("path,label\na.png,cat\n\nb.png,dog\n./a.png,dog\n", "line 5: duplicate path"),
        ("path,label\na.png,cat\nmissing.png,dog\n", "line 3: .*missing.png does not exist"),
        ("path,label\na.png,cat\nsub,dog\n", "line 3: .*sub is a directory"),
        ("path,label\na.png\n", "line 2: expected at least 2 columns"),
        ("path,label\na.png,cat\nb.png,fox\n", r"line 3: label 'fox'.*\(cat, dog\)"),
    ],
)
def test_read_labels_csv_errors_name_the_line(tmp_path, content, message):
    gen.make_rgb(tmp_path / "a.png")
    gen.make_rgb(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labels_csv(csv_path, classes=["cat", "dog"])


def test_read_labels_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labels_csv(tmp_path / "nope.csv")


# --- scan_inputs ------------------------------------------------------------------------------


def test_scan_inputs_files_and_folders(tmp_path):
    folder = tmp_path / "folder"
    inside = [gen.make_rgb(folder / n) for n in ["b.png", "a.jpg", "sub/c.webp"]]
    gen.make_text_file(folder / "notes.txt")
    gen.make_zero_byte(folder / "zero.jpg")
    odd = gen.make_rgb(tmp_path / "photo.dat", format="PNG")  # named explicitly: kept
    hidden = gen.make_rgb(tmp_path / ".hidden.png")
    images = scan_inputs([odd, folder, hidden, str(inside[0]), odd])
    a, b, c = (str(p) for p in [inside[1], inside[0], inside[2]])
    assert images.paths == [str(odd), a, b, c, str(hidden)]
    assert images.labels is None and images.classes == []
    assert images.skipped == [Skipped(str(folder / "zero.jpg"), "zero-byte file")]


def test_scan_inputs_accepts_a_single_path(tmp_path):
    path = gen.make_rgb(tmp_path / "a.png")
    assert scan_inputs(str(path)).paths == [str(path)]
    assert scan_inputs(path).paths == [str(path)]


def test_scan_inputs_explicit_broken_file_is_skipped(tmp_path):
    good = gen.make_rgb(tmp_path / "a.png")
    broken = gen.make_broken_symlink(tmp_path / "b.jpg")
    images = scan_inputs([good, broken])
    assert images.paths == [str(good)]
    assert images.skipped == [Skipped(str(broken), "broken symlink")]


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda d: [d / "nope.jpg"], "nope.jpg does not exist"),
        (lambda d: [], "no inputs given"),
        (lambda d: [gen.make_text_file(d / "empty" / "a.txt").parent], "no image files found"),
    ],
)
def test_scan_inputs_errors(tmp_path, make_inputs, message):
    with pytest.raises(DataError, match=message):
        scan_inputs(make_inputs(tmp_path))


# --- house rules ------------------------------------------------------------------------------


def test_data_module_imports_no_torch_typer_or_rich():
    code = (
        "import sys, tlearn.data; "
        "print(sorted(m for m in ('torch', 'typer', 'rich') if m in sys.modules))"
    )
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
