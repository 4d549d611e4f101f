"""How a job runs (not what it computes), as plain data the CLI fills in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tlearn.core.deadline import Deadline
from tlearn.core.errors import DataError, UsageError

# progress(stage, done, total): the CLI draws bars from it; None = silent.
Progress = Callable[[str, int, int], None]


@dataclass
class RunOptions:
    """How to run the backbone (not what it computes)."""

    batch_size: int = 32
    device: str = "auto"
    workers: int | None = None
    progress: Progress | None = None
    backend: str = "auto"  # auto | torch | onnx (tlearn.runtime)
    cache: bool = True  # read and write the on-disk feature cache (tlearn.cache)
    draft: bool = True  # JPEGs may decode at a reduced scale (data.load_image's min_size)
    decode: str = "auto"  # auto | cpu | gpu: where JPEGs decode (runtime.device.choose_decode)
    deadline: Deadline | None = None  # --time-limit: stop at the next safe point after it
    note: Callable[[str], None] | None = None  # a line for the user before a long stage

    def tell(self, text: str) -> None:
        """Pass a note (e.g. a time estimate) to the caller, if it listens."""
        if self.note is not None:
            self.note(text)

    def bar(self, stage: str):
        """A (done, total) progress callback for one stage, or None when silent."""
        if self.progress is None:
            return None
        return lambda done, total: self.progress(stage, done, total)


# --augment and --tta choices: checked before torch loads (runtime.augment builds them)
AUGMENTS = ("none", "flip", "light", "standard")
TTAS = ("none", "flip", "10crop")
# Cached frozen outputs can stand in for these (flip: features of the mirror images, or
# flipped prefix maps).
CACHEABLE_AUGMENTS = ("none", "flip")


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise UsageError(f"unknown --augment '{augment}'; allowed: {', '.join(AUGMENTS)}")
    return augment


def check_tta(tta: str) -> str:
    if tta not in TTAS:
        raise UsageError(f"unknown --tta '{tta}'; allowed: {', '.join(TTAS)}")
    return tta


def check_device(device: str) -> str:
    """--device is auto, cpu, cuda, cuda:N or mps (whether it exists here is checked when
    torch opens it)."""
    ok = device in ("auto", "cpu", "cuda", "mps") or (
        device.startswith("cuda:") and device[5:].isdigit()
    )
    if not ok:
        raise DataError(f"unknown --device '{device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    return device
