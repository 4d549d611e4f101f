"""Where a run's time goes: seconds per named stage (start-up, decode, host-to-device,
forward, device-to-host, cache, output), cheap enough to leave on (a perf_counter pair
per batch and stage), reported in a command's result (extract --json)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

# The stages extraction reports, in pipeline order (others may be added by name).
STARTUP = "start-up"  # process start (imports) to the first image read
MODEL = "model"  # opening the backbone / cached graph and sizing the features
AUTOTUNE = "autotune"  # a warm-up batch at the run's batch size (cuDNN picks its kernels)
CACHE_READ = "cache reads"  # hashing files to look them up, reading cached features
DECODE = "decode wait"  # the main thread waiting for decoded pixels
GPU_DECODE = "gpu decode"  # JPEG bytes -> pixels on the GPU (nvJPEG, resize, crop)
H2D = "host-to-device"  # staging pixels in pinned memory and queueing the copy
FORWARD = "forward"  # the network (on CPU: the whole runtime call)
D2H = "device-to-host"  # waiting for a batch's features to arrive in host memory
CACHE_WRITE = "cache writes"
OUTPUT = "output"  # the main thread writing (or handing over) table rows
OUTPUT_BACKGROUND = "output (background)"  # a writer thread's own time


class Stages:
    """Seconds and calls per stage. Safe to add to from a second thread (a writer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + calls

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def to_dict(self) -> dict[str, float]:
        """{stage: seconds}, rounded to 0.1 ms."""
        with self._lock:
            return {k: round(v, 4) for k, v in self.seconds.items()}


def timed(stages: Stages | None, name: str):
    """stages.timed(name), or a no-op context when there are no stages to add to."""
    return stages.timed(name) if stages is not None else contextlib.nullcontext()
