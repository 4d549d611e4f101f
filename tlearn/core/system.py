"""Facts about the machine and the process, read without importing torch: installed
versions, CPU cores, the torchrun environment, whether a run is certainly CPU-only."""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from tlearn.core.errors import UsageError
from tlearn.core.version import __version__


def dist_version(name: str) -> str | None:
    """An installed distribution's version, read from its metadata (no import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_cores() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a torchrun (torch.distributed) job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def dist_env(environ: dict | None = None) -> DistEnv | None:
    """Read RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (set by torchrun); None when
    this is not a multi-process job."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UsageError(
            "RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them); unset them "
            "to run a single process"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} with WORLD_SIZE={world}: RANK must be 0..WORLD_SIZE-1")
    if world == 1:
        return None
    return DistEnv(rank, world, local_rank, max(1, local_world))


def is_secondary_rank() -> bool:
    """True on ranks other than 0 of a torchrun job: they stay silent."""
    try:
        env = dist_env()
    except UsageError:
        return False
    return env is not None and env.rank != 0


def threads_per_rank(env: DistEnv, environ: dict | None = None) -> int:
    """torch threads for one rank: TLEARN_NUM_THREADS if set, else the CPU cores this
    process may use divided by the ranks on this machine (at least 1)."""
    environ = os.environ if environ is None else environ
    if environ.get("TLEARN_NUM_THREADS"):
        try:
            n = int(environ["TLEARN_NUM_THREADS"])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(
                f"TLEARN_NUM_THREADS={environ['TLEARN_NUM_THREADS']!r}: must be a whole number "
                "of at least 1"
            )
        return n
    return max(1, cpu_cores() // env.local_world_size)


def cpu_only(device: str) -> bool:
    """True when `device` certainly means the CPU, decided without importing torch:
    --device cpu, or auto on a machine with no GPU device nodes (NVIDIA, AMD, WSL) and
    not a Mac (MPS), or whose NVIDIA GPUs CUDA_VISIBLE_DEVICES hides."""
    if device == "cpu":
        return True
    if device != "auto" or sys.platform == "darwin":
        return False
    if any(glob.glob(p) for p in ("/dev/kfd", "/dev/dxg")):
        return False
    if not glob.glob("/dev/nvidia*"):
        return True
    # NVIDIA GPUs that CUDA_VISIBLE_DEVICES hides from this process: torch sees none either
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")


def versions() -> dict:
    """What a model directory records: tlearn's version and those of the libraries that
    determine its numbers (from package metadata: no imports of torch/timm)."""
    return {
        "tlearn": __version__,
        "timm": dist_version("timm"),
        "torch": dist_version("torch"),
        "scikit-learn": dist_version("scikit-learn"),
    }


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms resolution), so start-up
    can include the interpreter and its imports; None where it cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # the command name (field 2) may hold spaces: count fields after its ")"
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when `parent_pid` does, however the parent ends
    (SIGKILL included). Linux: the kernel sends SIGKILL at the parent's death (prctl
    PR_SET_PDEATHSIG); elsewhere a daemon thread checks the parent every 0.5 s. Either
    way, a parent already gone by now ends this process at once."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:  # died before the death signal was set up
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tlearn-parent-watch", daemon=True).start()
