"""JPEGs decoded on the GPU (`--decode gpu`): file bytes read (and hashed, for the feature
cache) by threads, decoded a batch at a time by nvJPEG (torchvision.io.decode_jpeg on
CUDA), turned upright, resized and centre-cropped on the device with the model's data
config, by the output size rule of tlearn.data.pixels.PilSteps. Batches come out as
uint8 NHWC tensors already on the device, in input order, like tlearn.data.decode's.

Only files Pillow would decode the same way go to the GPU: a complete baseline or
progressive JPEG with 1 or 3 colour components, within Pillow's pixel limit, whose EXIF
orientation can be read (tlearn.data.jpeg). Everything else, and any file nvJPEG refuses,
takes the CPU path (data.decode.decode_one), so unreadable images are reported exactly
as they always are. Pixels differ slightly from Pillow's (another IDCT and chroma
upsampling, no reduced-scale JPEG draft, torch's antialiased resize in float): features
stay within cosine 0.999 of CPU decoding on real photos (to be measured on a GPU,
docs/benchmarks.md) and are cached under their own key (cache.store.cut_key)."""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tlearn.core.hashing import content_key
from tlearn.core.stages import DECODE, GPU_DECODE, Stages, timed
from tlearn.core.system import cpu_cores
from tlearn.data.decode import decode_one
from tlearn.data.jpeg import jpeg_header
from tlearn.data.pixels import MAX_INTERMEDIATE_PIXELS, PilSteps

_PIL_LOCK = threading.Lock()  # load_image's warnings filters are per process, not thread


def gpu_decoder_available(device) -> bool:
    """Whether JPEGs can be decoded on `device`: CUDA and a torchvision with nvJPEG."""
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return False
    try:
        # torchvision is loaded with timm on every cold run; only its decoder is looked up
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def nvjpeg_decode(datas: Sequence[bytearray], device) -> list[torch.Tensor]:
    """RGB uint8 CHW tensors on `device`, one per JPEG; raises if any cannot be decoded."""
    # torchvision is loaded with timm on every cold run
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated
        warnings.simplefilter("ignore")
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


# ----------------------------------------------------------------------------- pixels


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image turned upright by its EXIF orientation, as Pillow's transposes do."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return img.flip(-1)
    if orientation == 3:  # ROTATE_180
        return img.flip((-2, -1))
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return img.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return img.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:  # TRANSVERSE
        return img.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:  # ROTATE_90
        return torch.rot90(img, 1, (-2, -1))
    return img


def resize(img: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    """uint8 CHW (or NCHW) resized to (h, w): antialiased bilinear/bicubic (Pillow's
    kernels) in float32, rounded back to uint8."""
    x = img.unsqueeze(0) if img.ndim == 3 else img
    y = torch.nn.functional.interpolate(
        x.float(), size=(h, w), mode=interpolation, align_corners=False, antialias=True
    )
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y[0] if img.ndim == 3 else y


def center_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """data.pixels.center_crop on a CHW tensor: zero padding where the image is smaller,
    offsets rounded half to even."""
    crop_h, crop_w = size
    height, width = img.shape[-2:]
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        img = torch.nn.functional.pad(img, (left, right, top, bottom), value=0)
        height, width = img.shape[-2:]
        if (height, width) == (crop_h, crop_w):
            return img
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return img[..., top : top + crop_h, left : left + crop_w]


def finish(img: torch.Tensor, orientation: int, steps: PilSteps) -> torch.Tensor:
    """A decoded CHW image -> upright, resized, cropped, as HWC (NHWC once stacked)."""
    return finish_upright([orient(img, orientation)], steps)[0]


def finish_upright(imgs: list[torch.Tensor], steps: PilSteps) -> list[torch.Tensor]:
    """Upright CHW images -> resized and cropped HWC ones. Images of one size are resized
    and cropped together (a folder of equal-sized photos: a few kernels per batch)."""
    groups: dict[tuple, list[int]] = {}
    for j, img in enumerate(imgs):
        groups.setdefault(tuple(img.shape), []).append(j)
    out: list = [None] * len(imgs)
    for shape, js in groups.items():
        x = imgs[js[0]].unsqueeze(0) if len(js) == 1 else torch.stack([imgs[j] for j in js])
        h, w = steps.output_size(int(shape[-1]), int(shape[-2]))
        if (int(shape[-2]), int(shape[-1])) != (h, w):  # as torchvision: else unchanged
            x = resize(x, h, w, steps.interpolation)
        x = center_crop(x, steps.crop).permute(0, 2, 3, 1)
        for k, j in enumerate(js):
            out[j] = x[k]
    return out


# ----------------------------------------------------------------------------- batches


@dataclass
class _Item:
    """One file as the reader thread left it: JPEG bytes for the GPU, or the CPU path's
    result (pixels, or the reason it failed)."""

    key: bytes | None
    data: bytearray | None = None
    orientation: int = 1
    pixels: np.ndarray | None = None
    reason: str | None = None


def _read_file(path: str) -> bytearray | None:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None  # FIFOs and devices must not be opened; the CPU path says why
        buf = bytearray(st.st_size)
        with open(path, "rb") as f:
            n = f.readinto(buf)
        return buf if n == st.st_size else None
    except OSError:
        return None


def gpu_decodable(data: bytearray | None):
    """The JPEG header when `data` is a JPEG nvJPEG may decode as Pillow would, else None."""
    if data is None:
        return None
    head = jpeg_header(data)
    limit = Image.MAX_IMAGE_PIXELS
    if (
        head is None
        or not head.complete
        or head.components not in (1, 3)
        or not 1 <= head.orientation <= 8
        or head.width < 1
        or head.height < 1
        or (limit is not None and head.width * head.height > limit)
    ):
        return None
    return head


def cpu_item(path: str, steps: PilSteps, min_size: int | None, keyed: bool) -> _Item:
    """The CPU path for one file, exactly as the decoding workers take it."""
    with _PIL_LOCK:
        pixels, reason, key = decode_one(path, steps, min_size, keyed)
    return _Item(key=key, pixels=pixels, reason=reason)


def read_item(path: str, steps: PilSteps, min_size: int | None, keyed: bool) -> _Item:
    """Run by a reader thread: the bytes of a JPEG for the GPU, else the CPU path (also for
    an aspect ratio whose whole resized image would be over MAX_INTERMEDIATE_PIXELS: the
    CPU path resizes only what the crop keeps)."""
    data = _read_file(path)
    head = gpu_decodable(data)
    if head is not None:
        h, w = steps.output_size(head.width, head.height)
        if h * w > MAX_INTERMEDIATE_PIXELS:
            head = None
    if head is None:
        return cpu_item(path, steps, min_size, keyed)
    return _Item(key=content_key(data) if keyed else None, data=data, orientation=head.orientation)


Decoder = Callable[[Sequence[bytearray], object], list]


def _decode_all(items: list[_Item], device, decoder: Decoder) -> list:
    """Decoded CHW tensors (None where one fails): the batch at once, one by one when
    the batch fails (nvJPEG returns nothing for a batch with one bad file)."""
    datas = [it.data for it in items]
    try:
        return list(decoder(datas, device))
    except RuntimeError:
        out = []
        for d in datas:
            try:
                out.append(decoder([d], device)[0])
            except RuntimeError:
                out.append(None)
        return out


def assemble(paths, start: int, items: list[_Item], steps, device, min_size, keyed, decoder):
    """(indices, NHWC uint8 on `device` or None, [(index, reason)], keys) of one batch."""
    gpu = [j for j, it in enumerate(items) if it.data is not None]
    images: dict[int, torch.Tensor] = {}
    if gpu:
        decoded = _decode_all([items[j] for j in gpu], device, decoder)
        upright = {}
        for j, img in zip(gpu, decoded, strict=True):
            if img is None:  # nvJPEG refused it: the CPU path decides, and words why
                items[j] = cpu_item(paths[start + j], steps, min_size, keyed)
            else:
                upright[j] = orient(img, items[j].orientation)
        images = dict(zip(upright, finish_upright(list(upright.values()), steps), strict=True))
    idx, tensors, bad, keys = [], [], [], []
    for j, it in enumerate(items):
        if j in images:
            tensors.append(images[j])
        elif it.pixels is not None:
            tensors.append(torch.from_numpy(it.pixels).to(device))
        else:
            bad.append((start + j, it.reason))
            continue
        idx.append(start + j)
        keys.append(it.key)
    x = torch.stack(tensors) if tensors else None
    return idx, x, bad, (keys if keyed else None)


def gpu_batches(
    paths: Sequence[str],
    steps: PilSteps,
    device,
    *,
    batch_size: int,
    min_size: int | None,
    keyed: bool,
    stages: Stages | None = None,
    decoder: Decoder | None = None,
    threads: int | None = None,
    prefetch: int = 4,
) -> Iterator:
    """Batches (indices, pixels NHWC uint8 on `device`, [(index, reason)], keys) in input
    order. Reader threads work up to `prefetch` batches ahead; the main thread decodes on
    the GPU (its kernels run asynchronously, beside the previous batch's forward).
    `decoder`: JPEG bytes -> CHW tensors on `device` (nvjpeg_decode; tests pass a fake)."""
    decoder = decoder or nvjpeg_decode
    paths = [str(p) for p in paths]
    threads = threads or max(2, min(16, 2 * cpu_cores()))
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tlearn-read")
    pending: deque = deque()
    starts = iter(range(0, len(paths), batch_size))
    try:

        def submit():
            while len(pending) < prefetch:
                lo = next(starts, None)
                if lo is None:
                    return
                chunk = paths[lo : lo + batch_size]
                futures = [pool.submit(read_item, p, steps, min_size, keyed) for p in chunk]
                pending.append((lo, futures))

        submit()
        while pending:
            lo, futures = pending.popleft()
            with timed(stages, DECODE):
                items = [f.result() for f in futures]
            submit()
            with timed(stages, GPU_DECODE):
                batch = assemble(paths, lo, items, steps, device, min_size, keyed, decoder)
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
