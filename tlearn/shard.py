"""Scale-out for extract and predict: split the input list into shards, write each shard
as a part file, and merge parts back into exactly the output a single process writes.

Two ways to run shards:

- `--shard I/N` (independent processes: job arrays, GNU parallel): the process extracts
  shard I of N into `OUT.part-0000I-of-0000N` plus its sidecar `OUT.part-...json`; later
  `tlearn merge OUT.part-* -o OUT` checks the parts and joins them.
- under torchrun (RANK/WORLD_SIZE in the environment, WORLD_SIZE > 1): rank R extracts
  shard R of WORLD_SIZE into its part, the ranks synchronise, and rank 0 merges the parts
  into OUT and removes them. `predict` gathers the (small) predictions on rank 0 instead.

Shards are contiguous runs of whole batches of the input list (in the order a single run
uses). So each batch a shard computes holds exactly the images of the same batch in a
single run: kernels that pick their algorithm by batch size (oneDNN convolutions on CPU,
cuDNN) see the same batches, and the merged CSV is byte-identical to a single run's,
provided every process uses the same --batch-size and the same number of torch threads.

`fit --head linear|mlp` also runs under torchrun, data-parallel (see tlearn.ddp); this
module provides the process group and the status exchange it uses.

Part sidecars record the shard (index, count, range, batch size) and the identity of the
input list (sha256 of the ordered paths and labels), so `merge` can refuse a missing,
duplicated or foreign part. Nothing here prints; torch is imported only where needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from tlearn.core import errors
from tlearn.core.atomic import atomic_file, write_json
from tlearn.core.errors import DataError, TlearnError, UsageError
from tlearn.core.system import DistEnv, dist_env, threads_per_rank
from tlearn.data.imageset import Skipped
from tlearn.data.skipped import SKIPPED_CSV, write_skipped_csv
from tlearn.modeldir import model_sha256

PREDICTIONS_FORMAT = "tlearn-predictions"


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(
                f"--shard {self.index}/{self.count}: I must be 0..N-1 and N at least 1, "
                "e.g. --shard 0/4 up to --shard 3/4"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m:
            raise UsageError(
                f"--shard {text!r}: expected I/N (this is shard I of N, counting from 0), "
                "e.g. --shard 0/4"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def range(self, total: int, batch_size: int) -> tuple[int, int]:
        """[start, stop) of this shard in a list of `total` items: whole batches of
        `batch_size`, split as evenly as possible, earlier shards taking the extra one."""
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be at least 1")
        batches = -(-total // batch_size)
        per, extra = divmod(batches, self.count)

        def first_batch(i: int) -> int:
            return i * per + min(i, extra)

        start = min(total, first_batch(self.index) * batch_size)
        stop = min(total, first_batch(self.index + 1) * batch_size)
        return start, stop


def part_path(out: str | Path, shard: Shard) -> Path:
    """OUT.part-00001-of-00004 for shard 1 of 4 (its sidecar adds .json)."""
    return Path(f"{out}.part-{shard.index:05d}-of-{shard.count:05d}")


def part_sidecar(part: str | Path) -> Path:
    return Path(f"{part}.json")


def inputs_sha256(paths: Sequence[str], labels: Sequence[str | None] | None) -> str:
    """Identity of the ordered input list (paths and their labels, if any)."""
    text = json.dumps({"paths": list(paths), "labels": None if labels is None else list(labels)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PartPlan:
    """What one shard covers, and what its sidecar records."""

    shard: Shard
    start: int
    stop: int
    total: int
    batch_size: int
    inputs_sha256: str
    scan_skipped: list[Skipped] = field(default_factory=list)

    def path(self, out: str | Path) -> Path:
        return part_path(out, self.shard)

    def info(self, skipped: Sequence[Skipped] | None = None) -> dict:
        """The sidecar's "shard" entry. `skipped` (this shard's unreadable images) is
        added only once the part is complete: merge refuses a part without it."""
        d = {
            "index": self.shard.index,
            "count": self.shard.count,
            "start": self.start,
            "stop": self.stop,
            "total": self.total,
            "batch_size": self.batch_size,
            "inputs_sha256": self.inputs_sha256,
            "scan_skipped": [[s.path, s.reason] for s in self.scan_skipped],
        }
        if skipped is not None:
            d["skipped"] = [[s.path, s.reason] for s in skipped]
        return d

    def check_resume(self, done: set[str] | Sequence[str], paths: Sequence[str]) -> None:
        """Rows kept from an interrupted run of this part must lie in its range."""
        mine = set(paths[self.start : self.stop])
        if any(p not in mine for p in done):
            raise DataError(
                f"the partial file of shard {self.shard.index}/{self.shard.count} holds images "
                "outside this shard (another --batch-size or input list?); run without --resume"
            )


def plan_part(
    shard: Shard,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    scan_skipped: Sequence[Skipped],
    batch_size: int,
) -> PartPlan:
    start, stop = shard.range(len(paths), batch_size)
    return PartPlan(
        shard=shard,
        start=start,
        stop=stop,
        total=len(paths),
        batch_size=batch_size,
        inputs_sha256=inputs_sha256(paths, labels),
        scan_skipped=list(scan_skipped),
    )


def finish_features_part(part: str | Path, skipped: Sequence[Skipped]) -> None:
    """Mark a features part complete: add its unreadable images to the sidecar."""
    side = part_sidecar(part)
    meta = json.loads(side.read_text(encoding="utf-8"))
    meta["shard"]["skipped"] = [[s.path, s.reason] for s in skipped]
    write_json(side, meta)


def write_predictions_part(
    output: str | Path,
    text: str,
    part: dict,
    *,
    rows: int,
    output_format: str,
    model_dir: str | Path,
    options: dict,
) -> Path:
    """Write one shard's rendered predictions (csv, json or jsonl) and its sidecar."""
    if output_format not in ("csv", "json", "jsonl"):
        raise UsageError(
            f"--format {output_format} cannot be split into shards; use csv, json or jsonl"
        )
    shard = Shard(part["index"], part["count"])
    path = part_path(output, shard)
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    meta = {
        "format": PREDICTIONS_FORMAT,
        "output_format": output_format,
        "model_sha256": model_sha256(model_dir),
        "options": options,
        "shard": part,
        "rows": rows,
    }
    write_json(part_sidecar(path), meta)
    return path


def score_by_batch(score, X, batch_of, n_classes: int):
    """`score(X)` computed one input batch at a time (`batch_of[i]`: the batch of row i).
    BLAS gives a row's result according to the matrix's shape, so scoring the same batches
    as a single run keeps predictions bit-identical however the inputs are sharded."""
    import numpy as np

    if len(X) == 0:
        return np.zeros((0, n_classes))
    cuts = [0, *(np.flatnonzero(np.diff(batch_of)) + 1).tolist(), len(X)]
    return np.concatenate([score(X[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])


# ----------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    kind: str  # "features" or "predictions"
    out: str
    parts: int
    rows: int
    skipped: list[Skipped]


@dataclass
class _Part:
    path: Path
    meta: dict
    shard: dict


def _read_part(path: Path) -> _Part:
    side = part_sidecar(path)
    if not path.is_file():
        raise DataError(f"part {path} does not exist; every shard 0..N-1 must have finished")
    if not side.is_file():
        raise DataError(
            f"{path} has no sidecar {side.name}; merge takes the OUT.part-I-of-N files that "
            "extract/predict --shard write"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{side}: not valid JSON ({e})") from None
    shard = meta.get("shard") if isinstance(meta, dict) else None
    if not isinstance(shard, dict):
        raise DataError(
            f"{path} is not a shard part (its sidecar has no 'shard' entry); merge takes the "
            "OUT.part-I-of-N files that extract/predict --shard write"
        )
    keys = ("index", "count", "start", "stop", "total", "batch_size", "inputs_sha256")
    if any(k not in shard for k in keys) or "scan_skipped" not in shard:
        raise DataError(f"{side}: damaged shard entry; rerun that shard")
    if "skipped" not in shard:
        raise DataError(f"{path} is incomplete (its run was interrupted); rerun that shard")
    return _Part(path=path, meta=meta, shard=shard)


def _unique_parts(paths: Sequence[str | Path]) -> list[Path]:
    """The part files named, each once: a sidecar stands for its part (so a shell glob
    OUT.part-* that also matches the .json files works)."""
    seen, unique = set(), []
    for p in map(Path, paths):
        if p.suffix == ".json" and p.with_suffix("").is_file():
            p = p.with_suffix("")
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _describe_shard(p: _Part) -> str:
    return f"{p.path.name} (shard {p.shard['index']}/{p.shard['count']})"


def check_parts(paths: Sequence[str | Path]) -> list[_Part]:
    """Read and cross-check parts; return them in shard order. Refuses parts from other
    runs (input list, cut, options, batch size), duplicates and gaps."""
    if not paths:
        raise UsageError("merge needs part files, e.g. tlearn merge features.csv.part-* -o OUT")
    parts = [_read_part(p) for p in _unique_parts(paths)]
    first = parts[0]
    for p in parts[1:]:
        for key, what in (
            ("count", "shard count N"),
            ("inputs_sha256", "input list"),
            ("total", "number of inputs"),
            ("scan_skipped", "input list"),
            ("batch_size", "--batch-size"),
        ):
            if p.shard[key] != first.shard[key]:
                hint = (
                    "shards follow batch boundaries, so all need the same --batch-size"
                    if key == "batch_size"
                    else "run every shard with the same inputs, options and working directory"
                )
                raise DataError(
                    f"{_describe_shard(p)} has another {what} than {_describe_shard(first)}; {hint}"
                )
        diff = _meta_difference(first.meta, p.meta)
        if diff:
            raise DataError(
                f"{_describe_shard(p)} was made with another {diff} than "
                f"{_describe_shard(first)}; parts must come from one run's options"
            )
    by_index: dict[int, _Part] = {}
    for p in parts:
        i = p.shard["index"]
        if i in by_index:
            raise DataError(
                f"shard {i} given twice ({by_index[i].path} and {p.path}); pass each part once"
            )
        by_index[i] = p
    n = first.shard["count"]
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        names = ", ".join(part_path("OUT", Shard(i, n)).name.replace("OUT", "") for i in missing)
        raise DataError(
            f"{len(missing)} of {n} parts missing (shard {', '.join(map(str, missing[:10]))}: "
            f"{names[:200]}); run those shards, then merge all {n}"
        )
    ordered = [by_index[i] for i in range(n)]
    expected = 0
    for p in ordered:
        s = p.shard
        if s["start"] != expected or s["stop"] < s["start"]:
            raise DataError(f"{_describe_shard(p)} does not continue where the previous part ends")
        if int(p.meta.get("rows", -1)) + len(s["skipped"]) != s["stop"] - s["start"]:
            raise DataError(
                f"{_describe_shard(p)} holds {p.meta.get('rows')} rows + {len(s['skipped'])} "
                f"skipped for {s['stop'] - s['start']} inputs; rerun that shard"
            )
        expected = s["stop"]
    if expected != first.shard["total"]:
        raise DataError(f"the parts cover {expected} of {first.shard['total']} inputs")
    return ordered


_META_NAMES = {
    "cut": "model, weights, layer or pool",
    "data_config": "preprocessing",
    "feature_dim": "feature size",
    "versions": "tlearn/timm/torch version",
    "format": "kind of output",
    "output_format": "--format",
    "model_sha256": "model directory",
    "options": "--top-k/--all-scores",
}


def _meta_difference(a: dict, b: dict) -> str | None:
    for key in sorted(set(a) | set(b)):
        if key in ("shard", "rows"):
            continue
        if a.get(key) != b.get(key):
            return _META_NAMES.get(key, f"'{key}'")
    return None


def merge_parts(paths: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Join checked parts in input order into `out` (atomically), as a single process
    would have written it: features CSV + sidecar, or predictions; skipped.csv beside."""
    parts = check_parts(paths)
    out = Path(out)
    if any(out.resolve() == p.path.resolve() for p in parts):
        raise UsageError(f"-o {out} is one of the parts; choose the final output name")
    first = parts[0]
    kind = "predictions" if first.meta.get("format") == PREDICTIONS_FORMAT else "features"
    if kind == "features":
        _merge_features_csv(parts, out)
    else:
        _merge_predictions(parts, out)
    skipped = [Skipped(*s) for s in first.shard["scan_skipped"]]
    for p in parts:
        skipped += [Skipped(*s) for s in p.shard["skipped"]]
    write_skipped_csv(out.parent / SKIPPED_CSV, skipped)
    rows = sum(int(p.meta["rows"]) for p in parts)
    return MergeResult(kind=kind, out=str(out), parts=len(parts), rows=rows, skipped=skipped)


def _merge_features_csv(parts: list[_Part], out: Path) -> None:
    header = None
    with atomic_file(out, "wb") as f:
        for p in parts:
            with open(p.path, "rb") as src:
                # The header is path,label,f0..fN: never quoted, so it ends at the first \n.
                head = src.readline()
                if header is None:
                    header = head
                    f.write(head)
                elif head != header:
                    raise DataError(f"{p.path} has another CSV header than {parts[0].path}")
                shutil.copyfileobj(src, f, 1 << 20)
    meta = {}
    for key, value in parts[0].meta.items():
        if key != "shard":
            meta[key] = value
    meta["rows"] = sum(int(p.meta["rows"]) for p in parts)
    from tlearn.features.table import sidecar_path

    write_json(sidecar_path(out), meta)


def _merge_predictions(parts: list[_Part], out: Path) -> None:
    texts = []
    for p in parts:
        with open(p.path, encoding="utf-8", newline="") as f:  # keep the CSV's \r\n
            texts.append(f.read())
    fmt = parts[0].meta.get("output_format")
    text = join_prediction_texts(fmt, texts, [str(p.path) for p in parts])
    with atomic_file(out, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def join_prediction_texts(fmt: str, texts: Sequence[str], names: Sequence[str]) -> str:
    """Concatenate rendered predictions of consecutive shards, as one render would be."""
    if fmt == "jsonl":
        return "".join(texts)
    if fmt == "csv":
        import csv
        import io

        header = None
        body = []
        for text, name in zip(texts, names, strict=True):
            buf = io.StringIO(text, newline="")
            next(csv.reader(buf), None)  # csv-aware: a class name may be quoted
            head, rest = text[: buf.tell()], text[buf.tell() :]
            if header is None:
                header = head
            elif head != header:
                raise DataError(f"{name} has another CSV header than {names[0]}")
            body.append(rest)
        return (header or "") + "".join(body)
    if fmt == "json":
        merged = None
        for text, name in zip(texts, names, strict=True):
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise DataError(f"{name}: not valid JSON ({e})") from None
            if merged is None:
                merged = obj
            else:
                rest = {k: v for k, v in obj.items() if k != "predictions"}
                if rest != {k: v for k, v in merged.items() if k != "predictions"}:
                    raise DataError(f"{name} differs from {names[0]} in more than predictions")
                merged["predictions"] = merged["predictions"] + obj["predictions"]
        # Same dump as `tlearn predict --format json`; float reprs round-trip exactly.
        return json.dumps(merged, ensure_ascii=False) + "\n"
    raise DataError(f"cannot merge predictions in format {fmt!r}; use csv, json or jsonl")


def remove_part(part: str | Path) -> None:
    Path(part).unlink(missing_ok=True)
    part_sidecar(part).unlink(missing_ok=True)


TORCHRUN_COMMANDS = ("extract", "predict", "fit")  # fit: neural heads only (tlearn.ddp)


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
    from tlearn.core.spec import NN_HEADS

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
        import datetime

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
            import atexit

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
        from dataclasses import replace

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
    import logging

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
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _status(error: BaseException | None) -> dict:
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


def _raise_first_failure(statuses: list[dict], rank: int, own: BaseException | None) -> None:
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


def extract(data, out, *, shard: Shard | None = None, **kwargs):
    """pipeline.extract, sharded: with `shard` this process writes that part; under
    torchrun every rank writes its part and rank 0 merges them into `out`. Returns the
    ExtractResult (on rank 0; None on other ranks)."""
    from tlearn.core.options import RunOptions
    from tlearn.pipeline import ExtractResult, extract

    env = dist_env()
    if env is None:
        return extract(data, out, shard=shard, **kwargs)
    if shard is not None:
        raise UsageError("--shard and torchrun both split the inputs; use one of them")
    if str(out) == "-":
        raise UsageError(
            "under torchrun each rank writes a part file, so -o - cannot be used; use -o FILE"
        )
    t0 = time.perf_counter()
    mine = Shard(env.rank, env.world_size)
    with ProcessGroup(env) as group:
        kwargs["run"] = group.run_options(kwargs.get("run") or RunOptions())
        res, own = None, None
        try:
            res = extract(data, out, shard=mine, **kwargs)
        except Exception as e:
            own = e
        statuses = group.all_gather_json(_status(own))
        if any(not s["ok"] for s in statuses):
            remove_part(part_path(out, mine))  # nothing final is written
        _raise_first_failure(statuses, env.rank, own)

        merged, own = None, None
        if env.rank == 0:
            try:
                merged = _merge_ranks(out, env.world_size)
            except Exception as e:
                own = e
        statuses = group.all_gather_json(_status(own))
        _raise_first_failure(statuses, env.rank, own)
    if env.rank != 0:
        return None
    return ExtractResult(
        rows=merged.rows,
        feature_dim=res.feature_dim,
        out=str(out),
        skipped=merged.skipped,
        warnings=res.warnings,
        seconds=time.perf_counter() - t0,
    )


def _merge_ranks(out, world_size: int) -> MergeResult:
    parts = [part_path(out, Shard(i, world_size)) for i in range(world_size)]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise DataError(
            f"rank 0 cannot see {missing[0]}: with several machines, -o must be on a "
            "filesystem that every node shares"
        )
    merged = merge_parts(parts, out)
    for p in parts:
        remove_part(p)
    return merged


def predict(model_dir, inputs, *, shard: Shard | None = None, **kwargs):
    """pipeline.predict, sharded: with `shard` only that part of the inputs is predicted
    (result.part describes it); under torchrun each rank predicts its part and rank 0
    gets all predictions in input order. Returns the PredictResult (None on ranks > 0)."""
    from tlearn.core.options import RunOptions
    from tlearn.pipeline import Prediction, PredictResult, predict

    env = dist_env()
    if env is None:
        return predict(model_dir, inputs, shard=shard, **kwargs)
    if shard is not None:
        raise UsageError("--shard and torchrun both split the inputs; use one of them")
    with ProcessGroup(env) as group:
        kwargs["run"] = group.run_options(kwargs.get("run") or RunOptions())
        res, own = None, None
        try:
            res = predict(model_dir, inputs, shard=Shard(env.rank, env.world_size), **kwargs)
        except Exception as e:
            own = e
        statuses = group.all_gather_json(_status(own))
        _raise_first_failure(statuses, env.rank, own)
        # Predictions are small next to features: gather them on rank 0 instead of writing
        # parts, so predict needs no shared filesystem. Rank 0 renders them like a single run.
        payload = {
            "predictions": [[p.path, p.label, p.score, p.scores] for p in res.predictions],
            "skipped": res.part["skipped"],
        }
        gathered = group.gather_json(payload)
    if env.rank != 0:
        return None
    predictions, skipped = [], [Skipped(*s) for s in res.part["scan_skipped"]]
    for g in gathered:
        predictions += [Prediction(*p) for p in g["predictions"]]
        skipped += [Skipped(*s) for s in g["skipped"]]
    return PredictResult(
        predictions=predictions,
        classes=res.classes,
        score_kind=res.score_kind,
        skipped=skipped,
        warnings=res.warnings,
    )


# ----------------------------------------------------------------------------- Ray & co


class BatchExtractor:
    """Features for a batch of image paths, for batch mappers such as Ray Data's
    `Dataset.map_batches` (a callable class: the backbone loads once per actor).

    `batch["path"]` holds image paths; the result has one row per input row: "path",
    "features" (float32, NaN where the image could not be read) and "skipped" (the reason,
    or "" for a readable image). The same backbone/cut/pool/preprocessing as
    `tlearn extract` with the same options.
    """

    def __init__(
        self,
        model: str | None = None,
        weights: str = "auto",
        layers=None,
        pool: str = "avg",
        device: str = "auto",
        backend: str = "auto",
    ):
        from tlearn.core.options import RunOptions
        from tlearn.core.spec import DEFAULT_MODEL
        from tlearn.features.engine import CutRequest, open_engine

        # The same engine as `tlearn extract` (ONNX Runtime on CPU by default), so features
        # match it bit for bit; no disk cache inside a batch mapper.
        self.run = RunOptions(device=device, backend=backend, cache=False, workers=0)
        request = CutRequest(model or DEFAULT_MODEL, weights, layers, pool)
        self.engine = open_engine(request, self.run)
        self.spec, self.data_config = self.engine.spec, self.engine.data_config
        self.dim = self.engine.feature_dim()

    def __call__(self, batch: dict) -> dict:
        from dataclasses import replace

        import numpy as np

        paths = [str(p) for p in batch["path"]]
        # one batch, decoded in this process: the batch mapper parallelises
        run = replace(self.run, batch_size=max(1, len(paths)))
        feats = self.engine.extract(paths, run, stage="extract")
        X = np.full((len(paths), self.dim), np.nan, dtype=np.float32)
        if len(feats.indices):
            X[feats.indices] = feats.X
        reasons = {s.path: s.reason for s in feats.skipped}
        return {
            "path": np.asarray(paths, dtype=object),
            "features": X,
            "skipped": np.asarray([reasons.get(p, "") for p in paths], dtype=object),
        }
