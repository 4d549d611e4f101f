"""torch inference on the cut network: channels_last, fp16 autocast on CUDA, and uint8
pixel input normalised on the device."""

from __future__ import annotations

import time

import numpy as np
import torch

from tlearn.core.stages import D2H, FORWARD, H2D
from tlearn.runtime.ort import Ready

# ----------------------------------------------------------------------------- runtimes


class PixelInput(torch.nn.Module):
    """uint8 NHWC pixels -> ToTensor + Normalize arithmetic -> the feature network."""

    def __init__(self, net: torch.nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # permute gives a channels_last view; the float math is ToTensor's and Normalize's.
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        return self.net(x.sub(self.mean).div(self.std))


def example_input(data_config: dict, n: int, pixels: bool, random: bool = False):
    c, h, w = data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    if pixels:
        if random:
            return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        return torch.zeros(n, h, w, c, dtype=torch.uint8)
    return torch.randn(n, c, h, w, generator=g) if random else torch.zeros(n, c, h, w)


class TorchRuntime:
    """torch inference: channels_last (faster for convolutions on CPU and CUDA) and fp16
    autocast on CUDA. With `pixels` (transform, mean, std) it takes uint8 NHWC batches and
    normalises them on the device (on a GPU: 4x less to copy over PCIe).

    On CUDA, `submit` queues a batch and returns at once: the pixels are staged in pinned
    host memory and copied asynchronously, the forward pass and the copy of the features
    back into pinned memory are queued on the stream, and the caller waits only when it
    asks for the result, up to `in_flight` batches later (tlearn.features.stream), so
    decoding the next batches overlaps the GPU's work. Batches smaller than the largest
    seen are padded to it (the padding's features are dropped), so cuDNN's autotuning
    (`cudnn.benchmark`) runs for one batch shape only. `stages` (core.stages.Stages) gets
    the host time of each step and, from CUDA events, the device time."""

    name = "torch"
    CUDA_IN_FLIGHT = 3

    def __init__(self, net: torch.nn.Module, device: torch.device, pixels=None, in_flight=None):
        self.device = device
        self.transform = None
        if pixels is not None:
            self.transform = pixels[0]
            net = PixelInput(net, pixels[1], pixels[2])
        self.channels_last = device.type in ("cpu", "cuda")
        self.amp = device.type == "cuda"
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        net = net.to(device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.in_flight = (in_flight or self.CUDA_IN_FLIGHT) if self.cuda else 1
        self.stages = None
        self.pad_to = 0
        self._slots: list[_Slot] = []
        self._next = 0

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4 and x.dtype != torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp),
        ):
            return self.net(x)

    def __call__(self, x) -> np.ndarray:
        if self.cuda:
            return self.submit(x).result()
        if isinstance(x, np.ndarray):  # uint8 pixels from tlearn.decode
            x = torch.from_numpy(x)
        return self._run(x.to(self.device)).float().cpu().numpy()

    def submit(self, x):
        """Start a batch; `.result()` gives its (B, D) float32 features."""
        if not self.cuda:
            t0 = time.perf_counter()
            features = self(x)
            _add(self.stages, FORWARD, time.perf_counter() - t0)
            return Ready(features)
        return self._submit_cuda(torch.from_numpy(x) if isinstance(x, np.ndarray) else x)

    def _slot(self) -> _Slot:
        if not self._slots:
            self._slots = [_Slot() for _ in range(self.in_flight + 1)]
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        return slot

    def _submit_cuda(self, x: torch.Tensor) -> _CudaPending:
        n = len(x)
        self.pad_to = max(self.pad_to, n)
        slot = self._slot()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        t0 = time.perf_counter()
        keep = None
        if x.device.type == "cpu":
            if x.is_pinned() and n == self.pad_to:
                keep, src = x, x  # pinned by the DataLoader: copy from it directly
            else:
                src = slot.staging((self.pad_to, *x.shape[1:]), x.dtype)
                src[:n].copy_(x)
                if n < self.pad_to:
                    src[n:].zero_()
            ev[0].record()
            xd = src.to(self.device, non_blocking=True)
            slot.copied.record()  # the staging buffer is free again after this
        else:  # decoded on the GPU already
            ev[0].record()
            xd = (
                x
                if n == self.pad_to
                else torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
            )
        ev[1].record()
        t1 = time.perf_counter()
        y = self._run(xd)[:n].float()
        ev[2].record()
        out = slot.output(y.shape)
        out.copy_(y, non_blocking=True)
        ev[3].record()
        t2 = time.perf_counter()
        _add(self.stages, H2D, t1 - t0)
        _add(self.stages, FORWARD, t2 - t1)
        return _CudaPending(out, ev, self.stages, keep)


def _add(stages, name: str, seconds: float) -> None:
    if stages is not None:
        stages.add(name, seconds)


class _Slot:
    """Pinned host buffers of one batch in flight: the pixels staged for the copy to the
    GPU, and the features copied back."""

    def __init__(self):
        self.copied = torch.cuda.Event()
        self.copied.record()
        self._in: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def staging(self, shape, dtype) -> torch.Tensor:
        self.copied.synchronize()  # the last copy out of this buffer has finished
        if self._in is None or self._in.shape != shape or self._in.dtype != dtype:
            self._in = torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._in

    def output(self, shape) -> torch.Tensor:
        # free: its batch's result was taken before this slot came round again
        if self._out is None or self._out.shape[1:] != shape[1:] or len(self._out) < shape[0]:
            self._out = torch.empty((max(shape[0], 1), *shape[1:]), pin_memory=True)
        return self._out[: shape[0]]


class _CudaPending:
    def __init__(self, out: torch.Tensor, events, stages, keep):
        self.out, self.events, self.stages, self.keep = out, events, stages, keep

    def result(self) -> np.ndarray:
        t0 = time.perf_counter()
        self.events[3].synchronize()
        _add(self.stages, D2H, time.perf_counter() - t0)
        if self.stages is not None:
            e = self.events
            for name, a, b in ((H2D, 0, 1), (FORWARD, 1, 2), (D2H, 2, 3)):
                self.stages.add(f"{name} (device)", a_to_b(e[a], e[b]))
        self.keep = None
        return self.out.numpy().copy()


def a_to_b(a, b) -> float:
    """Seconds between two recorded, completed CUDA events."""
    return a.elapsed_time(b) / 1000.0
