"""--decode auto|cpu|gpu without a GPU: the choice, the JPEG header reader, the GPU path's
pixel steps against Pillow's, and its batches (read in threads, decoded by a stand-in for
nvJPEG that runs on the CPU) against the CPU path's: the same order, the same skipped
images with the same reasons, the same cache keys. The rest of the GPU path (nvJPEG,
pinned buffers, batches in flight on a real device) is measured on a GPU machine by
benchmarks/gpu_extract.py."""

from __future__ import annotations

import io
import warnings
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

import tlearn.runtime.gpu_decode as gpu_decode
from tests.conftest import TINY, draw, make_dataset
from tlearn.cli.app import app
from tlearn.core.errors import UsageError
from tlearn.core.stages import Stages
from tlearn.data.decode import decoded_batches
from tlearn.data.jpeg import jpeg_header
from tlearn.data.pixels import PilSteps
from tlearn.features import stream
from tlearn.runtime.device import choose_decode
from tlearn.runtime.ort import Ready

STEPS = PilSteps(resize=(40,), interpolation="bicubic", crop=(32, 32))


def cpu_nvjpeg(datas, device):
    """nvJPEG's stand-in: torchvision's CPU decoder, same call shape, raises on bad data."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for d in datas:
            out.append(decode_jpeg(torch.frombuffer(d, dtype=torch.uint8), mode=ImageReadMode.RGB))
        return out


# ----------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    "decode, device, backend, steps, nvjpeg, want",
    [
        ("auto", "cuda", "torch", STEPS, True, "gpu"),
        ("auto", "cpu", "onnx", STEPS, True, "cpu"),
        ("auto", "cpu", "torch", STEPS, True, "cpu"),
        ("auto", "cuda", "onnx", STEPS, True, "cpu"),
        ("auto", "cuda", "torch", None, True, "cpu"),
        ("auto", "cuda", "torch", PilSteps((40,), "lanczos", (32, 32)), True, "cpu"),
        ("auto", "cuda", "torch", STEPS, False, "cpu"),
        ("auto", "mps", "torch", STEPS, True, "cpu"),
        ("cpu", "cuda", "torch", STEPS, True, "cpu"),
        ("gpu", "cuda", "torch", STEPS, True, "gpu"),
    ],
)
def test_choose_decode(decode, device, backend, steps, nvjpeg, want):
    assert choose_decode(decode, device, backend, steps, nvjpeg) == want


@pytest.mark.parametrize(
    "device, backend, steps, nvjpeg, message",
    [
        ("cpu", "onnx", STEPS, True, "needs a CUDA device"),
        ("cuda", "onnx", STEPS, True, "needs the torch backend"),
        ("cuda", "torch", None, True, "resize . centre crop"),
        ("cuda", "torch", PilSteps((40,), "box", (32, 32)), True, "resize . centre crop"),
        ("cuda", "torch", STEPS, False, "nvJPEG"),
    ],
)
def test_decode_gpu_says_why_it_cannot_be_had(device, backend, steps, nvjpeg, message):
    with pytest.raises(UsageError, match=message):
        choose_decode("gpu", device, backend, steps, nvjpeg)


def test_unknown_decode_value():
    with pytest.raises(UsageError, match="allowed: auto, cpu, gpu"):
        choose_decode("fast", "cuda", "torch", STEPS, True)


@pytest.mark.parametrize("command", ["extract", "fit", "predict", "evaluate", "sweep"])
def test_decode_gpu_without_cuda_is_one_clear_error(runner, image_folder, tmp_path, command):
    model = tmp_path / "no-model"  # predict/evaluate fail on the option before loading it?
    args = {
        "extract": ["extract", str(image_folder), "-o", str(tmp_path / "f.csv"), *TINY],
        "fit": ["fit", str(image_folder), "-o", str(tmp_path / "m"), *TINY],
        "sweep": ["sweep", str(image_folder), *TINY],
        "predict": ["predict", str(model), str(image_folder)],
        "evaluate": ["evaluate", str(model), str(image_folder)],
    }[command]
    if command in ("predict", "evaluate"):
        r = runner.invoke(app, ["fit", str(image_folder), "-o", str(model), "-q", *TINY])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--decode", "gpu", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "--decode gpu needs a CUDA device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- JPEG headers


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_jpeg_header_reads_size_components_orientation_and_completeness():
    rgb = Image.new("RGB", (37, 21), (200, 30, 40))
    h = jpeg_header(_jpeg(rgb))
    assert (h.width, h.height, h.components, h.sof, h.orientation, h.complete) == (
        37,
        21,
        3,
        0xC0,
        1,
        True,
    )
    assert jpeg_header(_jpeg(rgb, progressive=True)).sof == 0xC2
    assert jpeg_header(_jpeg(rgb.convert("L"))).components == 1
    assert jpeg_header(_jpeg(rgb.convert("CMYK"))).components == 4
    for o in range(1, 9):
        assert jpeg_header(_jpeg(rgb, exif=_exif(o))).orientation == o
    data = _jpeg(rgb)
    assert not jpeg_header(data[: len(data) // 2] + b"\x00" * 100).complete
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(b"\xff\xd8\xff garbage") is None


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_transposes(orientation):
    from tlearn.data.image import load_image

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=_exif(orientation))
    upright = np.asarray(load_image("x.png", content=buf.getvalue()))
    got = gpu_decode.orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), upright)


@pytest.mark.parametrize(
    "steps",
    [
        STEPS,
        PilSteps(resize=(64,), interpolation="bilinear", crop=(56, 56)),
        PilSteps(resize=(48, 40), interpolation="bicubic", crop=(40, 40)),
        PilSteps(resize=(30,), interpolation="bicubic", crop=(32, 32)),  # pads
    ],
)
@pytest.mark.parametrize("size", [(250, 250), (120, 90), (33, 71), (40, 40), (17, 12)])
def test_gpu_resize_and_crop_follow_pillows_steps(steps, size):
    """The same output size, crop offsets and padding as PilSteps; the pixels within a
    few levels (float resize vs Pillow's fixed point)."""
    w, h = size
    rng = np.random.default_rng(w * h)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)  # smooth content
    want = steps(img).astype(np.int16)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    got = gpu_decode.finish(x, 1, steps).numpy().astype(np.int16)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


def test_images_of_one_size_are_resized_together_with_the_same_result():
    rng = np.random.default_rng(1)
    sizes = [(40, 50), (40, 50), (33, 71), (40, 50), (33, 71), (64, 64)]
    imgs = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    together = gpu_decode.finish_upright(imgs, STEPS)
    for img, got in zip(imgs, together, strict=True):
        torch.testing.assert_close(got, gpu_decode.finish(img, 1, STEPS), atol=1, rtol=0)


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def mixed(tmp_path):
    """JPEGs (plain, progressive, grey, EXIF-rotated), a CMYK JPEG, PNGs, and files the
    CPU path refuses (broken, truncated, empty, missing)."""
    paths = []
    for i in range(7):
        paths.append(draw(tmp_path / f"j{i}.jpg", (20 * i, 90, 140), seed=i, size=(50, 38)))
    img = Image.open(paths[0]).convert("RGB")
    img.save(tmp_path / "prog.jpg", progressive=True)
    img.convert("L").save(tmp_path / "grey.jpg")
    img.save(tmp_path / "rot.jpg", exif=_exif(6))
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    data = (tmp_path / "j1.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    names = ["prog.jpg", "grey.jpg", "rot.jpg", "cmyk.jpg", "trunc.jpg", "broken.jpg"]
    paths += [tmp_path / n for n in names]
    paths.insert(2, draw(tmp_path / "p.png", (10, 200, 10), seed=99, fmt="PNG"))
    paths += [tmp_path / "empty.jpg", tmp_path / "missing.jpg"]
    return [str(p) for p in paths]


def _run_gpu(paths, decoder=cpu_nvjpeg, batch_size=4, stages=None):
    return list(
        gpu_decode.gpu_batches(
            paths,
            STEPS,
            torch.device("cpu"),
            batch_size=batch_size,
            min_size=None,
            keyed=True,
            stages=stages,
            decoder=decoder,
            threads=3,
        )
    )


def _flatten(batches):
    idx = [i for b in batches for i in b[0]]
    bad = [x for b in batches for x in b[2]]
    keys = [k for b in batches for k in b[3]]
    px = {
        i: np.asarray(x)
        for b in batches
        if b[1] is not None
        for i, x in zip(b[0], b[1], strict=True)
    }
    return idx, bad, keys, px


def test_gpu_batches_match_the_cpu_path(mixed):
    cpu = list(decoded_batches(mixed, STEPS, batch_size=4, workers=0, min_size=None, keyed=True))
    stages = Stages()
    gpu = _run_gpu(mixed, stages=stages)
    c_idx, c_bad, c_keys, c_px = _flatten(cpu)
    g_idx, g_bad, g_keys, g_px = _flatten(gpu)
    assert g_idx == c_idx and g_keys == c_keys
    assert g_bad == c_bad  # the same images, with the same reasons
    assert {mixed[i].rsplit("/", 1)[1] for i, _ in g_bad} == {
        "trunc.jpg",
        "broken.jpg",
        "empty.jpg",
        "missing.jpg",
    }
    xs = [b[1] for b in gpu if b[1] is not None]
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (32, 32, 3) for x in xs)
    for i in g_idx:
        name = mixed[i].rsplit("/", 1)[1]
        diff = np.abs(g_px[i].astype(int) - c_px[i].astype(int))
        if name.endswith(".png") or name == "cmyk.jpg":  # the CPU path itself
            assert diff.max() == 0, name
        else:
            assert diff.mean() < 3, (name, diff.mean())
    assert {"decode wait", "gpu decode"} <= set(stages.seconds)


def test_a_file_nvjpeg_refuses_takes_the_cpu_path(mixed):
    """One bad file fails nvJPEG's whole batch: the others are decoded one by one, and it
    goes to the CPU path (whose pixels it then has, exactly)."""
    refused = open(mixed[1], "rb").read()
    calls = []

    def picky(datas, device):
        calls.append(len(datas))
        if any(bytes(d) == refused for d in datas):
            raise RuntimeError("nvjpeg: unsupported")
        return cpu_nvjpeg(datas, device)

    cpu = _flatten(
        list(decoded_batches(mixed, STEPS, batch_size=4, workers=0, min_size=None, keyed=True))
    )
    idx, bad, keys, px = _flatten(_run_gpu(mixed, decoder=picky))
    assert idx == cpu[0] and bad == cpu[1] and keys == cpu[2]
    np.testing.assert_array_equal(px[1], cpu[3][1])
    assert calls[:4] == [3, 1, 1, 1]  # the first batch: j0, j1, (p.png on the CPU), j2


def test_gpu_decoding_through_the_engine_has_its_own_cache_key(tmp_path, monkeypatch):
    """features.stream with decoder="gpu" (nvJPEG faked on the CPU, torch runtime on the
    CPU): features close to CPU decoding's, cached apart from them."""
    from tlearn.core.options import RunOptions
    from tlearn.features.engine import CutRequest, open_engine

    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gpu_decode, "nvjpeg_decode", cpu_nvjpeg)
    data = tmp_path / "data"
    make_dataset(data, n=3)
    paths = sorted(str(p) for p in data.rglob("*.*"))
    run = RunOptions(device="cpu", backend="torch", batch_size=4, workers=0)
    feats = {}
    for decoder in ("cpu", "gpu"):
        engine = open_engine(CutRequest("test_efficientnet", "none"), run)
        engine.decode = decoder  # what choose_decode picks on CUDA
        feats[decoder] = engine.extract(paths, run, stage="x")
        assert engine.summary()["computed"] == len(paths)  # not served from the other's cache
    a, b = feats["cpu"].X, feats["gpu"].X
    assert a.shape == b.shape
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2


# ----------------------------------------------------------------------------- in flight


class _Deferred:
    def __init__(self, log, i, x):
        self.log, self.i, self.x = log, i, x

    def result(self):
        self.log.append(("result", self.i))
        return self.x * 2


class _QueueingRuntime:
    """A runtime that, like CUDA's, returns before the features exist."""

    in_flight = 3

    def __init__(self):
        self.log = []
        self.n = 0

    def submit(self, x):
        self.log.append(("submit", self.n))
        self.n += 1
        return _Deferred(self.log, self.n - 1, x)


def test_batches_in_flight_keep_their_order():
    runtime = _QueueingRuntime()
    loader = [([i], np.full((1, 2), i, np.float32), [], [None]) for i in range(5)]
    out = list(stream._forward(runtime, iter(loader)))
    assert [o[0] for o in out] == [[i] for i in range(5)]
    assert [float(o[1][0, 0]) for o in out] == [0, 2, 4, 6, 8]
    # three batches are queued before the first result is waited for
    assert runtime.log[:4] == [("submit", 0), ("submit", 1), ("submit", 2), ("result", 0)]


def test_a_cpu_runtime_computes_each_batch_as_it_comes():
    seen = deque()

    class Sync:
        in_flight = 1

        def submit(self, x):
            seen.append(len(x))
            return Ready(x)

    loader = [([0], np.zeros((1, 2)), [], None), ([1], None, [(1, "bad")], None)]
    out = list(stream._forward(Sync(), iter(loader)))
    assert out[1][1] is None and list(seen) == [1]
