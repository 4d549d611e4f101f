"""torchrun: the process group tlearn commands use (gloo/nccl, a rank per GPU), small
JSON messages between ranks, one error policy for every rank, and a clean exit."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import sys
from dataclasses import replace
from typing import NoReturn

from tlearn.core import errors
from tlearn.core.errors import TlearnError, UsageError
from tlearn.core.spec import NN_HEADS
from tlearn.core.system import DistEnv, dist_env, threads_per_rank

TORCHRUN_COMMANDS = ("extract", "predict", "fit")  # fit: neural heads only (tlearn.train.dist)


def check_torchrun_command(command: str | None) -> None:
    """Under torchrun, refuse commands that would only run N times side by side."""
    env = dist_env()
    if env is not None and command not in TORCHRUN_COMMANDS:
        names = ", ".join(TORCHRUN_COMMANDS[:-1]) + f" and {TORCHRUN_COMMANDS[-1]}"
        raise UsageError(
            f"tlearn {command} does not run under torchrun (WORLD_SIZE={env.world_size}); "
            f"only {names} do: run it as one process"
        )


def check_torchrun_fit(head: str) -> None:
    """Under torchrun, fit trains neural heads only: svm/logreg fit in one process."""
    env = dist_env()

    if env is not None and head not in NN_HEADS:
        raise UsageError(
            f"tlearn fit --head {head} does not run under torchrun (WORLD_SIZE="
            f"{env.world_size}): it fits in one process; extract the features with torchrun "
            "... tlearn extract DATA -o features.csv, then run tlearn fit features.csv as one "
            "process, or train --head linear|mlp under torchrun"
        )


class ProcessGroup:
    """torch.distributed for tlearn commands: pins the rank to its GPU (LOCAL_RANK) when
    CUDA is there, sets its thread count, initialises the process group (gloo for CPU
    tensors, nccl for CUDA tensors) unless the caller already did, and exchanges small
    JSON messages between ranks (no pickle).

    The group lives until the process exits: under torchrun a second init_process_group
    after destroy_process_group hangs, and a script may run several commands."""

    TIMEOUT_S = 24 * 3600  # ranks wait for the slowest shard; torchrun reaps crashed ranks

    def __init__(self, env: DistEnv):
        self.env = env
        self.device: str | None = None

    def __enter__(self) -> ProcessGroup:

        # torch only when a process group runs: the CLI imports this module at start-up
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads_per_rank(self.env))
        backend = "gloo"
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            torch.cuda.set_device(self.env.local_rank % n)
            self.device = f"cuda:{self.env.local_rank % n}"
            backend = "cpu:gloo,cuda:nccl"
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=self.TIMEOUT_S)
            )
            atexit.register(_destroy_process_group)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An error that left the group without a status exchange happened on this rank
        # alone: the CLI prints it on every rank (others may only see a lost peer).
        if isinstance(exc, Exception) and not getattr(exc, "all_ranks", False):
            with contextlib.suppress(AttributeError):
                exc.rank_only = self.env.rank

    def run_options(self, run):
        """`run` with the device pinned to this rank's GPU when it would pick CUDA."""

        if self.device is not None and run.device in ("auto", "cuda"):
            return replace(run, device=self.device)
        return run

    def all_gather_json(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        return self._gather_json(obj, everyone=True)

    def gather_json(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
        return self._gather_json(obj, everyone=False)

    def _gather_json(self, obj, everyone: bool) -> list | None:
        # torch only when a process group runs: the CLI imports this module at start-up
        import torch
        import torch.distributed as dist

        world = self.env.world_size
        data = json.dumps(obj).encode("utf-8")
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if everyone or self.env.rank == 0:
            bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
        else:
            bufs = None
        if everyone:
            dist.all_gather(bufs, buf)
        else:
            dist.gather(buf, bufs, dst=0)
        if bufs is None:
            return None
        return [
            json.loads(b[: int(n.item())].numpy().tobytes().decode("utf-8"))
            for b, n in zip(bufs, sizes, strict=True)
        ]


def exit_rank(code=0) -> NoReturn:
    """End this torchrun rank now, skipping the interpreter's teardown.

    After the work was done and written, tearing down c10d/gloo at interpreter exit
    aborted a rank ("terminate called without an active exception", SIGABRT) in 3 of 25
    two-process fits on this 2-core machine, and torchrun then reports the whole job as
    failed. Leaving with os._exit after destroying the process group: 0 of 40. Everything
    tlearn writes is complete (and renamed into place) before this point."""

    # torch only when a process group runs: the CLI imports this module at start-up
    import torch.distributed as dist

    if isinstance(code, str):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else int(code)
    if code == 0 and dist.is_initialized():
        # Only on success: after an error another rank may be gone or stuck.
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _destroy_process_group() -> None:
    # torch only when a process group runs: the CLI imports this module at start-up
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def status_of(error: BaseException | None) -> dict:
    if error is None:
        return {"ok": True}
    message = (str(error).strip().splitlines() or [""])[0]
    return {
        "ok": False,
        "type": type(error).__name__,
        "tlearn": isinstance(error, TlearnError),
        "exit_code": getattr(error, "exit_code", 1),
        "message": message,
    }


def raise_first_failure(statuses: list[dict], rank: int, own: BaseException | None) -> None:
    """If any rank failed, fail every rank the same way: this rank's own error if it has
    one, else the lowest failing rank's (rank 0 prints it)."""
    failed = [(r, s) for r, s in enumerate(statuses) if not s["ok"]]
    if not failed:
        return
    if own is not None:
        with contextlib.suppress(AttributeError):
            own.all_ranks = True  # every rank raises now: rank 0 reports
        raise own
    r, s = failed[0]
    if s["tlearn"]:
        cls = getattr(errors, s["type"], TlearnError)
        try:
            err = cls(s["message"])
        except TypeError:  # an error class with another constructor
            err = TlearnError(s["message"])
        err.exit_code = s["exit_code"]
    else:
        err = TlearnError(f"rank {r} failed: unexpected {s['type']}: {s['message']}")
    err.all_ranks = True
    raise err
