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

`fit --head linear|mlp` also runs under torchrun, data-parallel (see tlearn.train.dist); this
module provides the process group and the status exchange it uses.

Part sidecars record the shard (index, count, range, batch size) and the identity of the
input list (sha256 of the ordered paths and labels), so `merge` can refuse a missing,
duplicated or foreign part. Nothing here prints; torch is imported only where needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file, write_json
from tlearn.core.errors import DataError, UsageError
from tlearn.core.hashing import inputs_sha256
from tlearn.data.imageset import Skipped
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
    """Write one shard's rendered predictions (csv, tsv, json or jsonl) and its sidecar."""
    if output_format not in ("csv", "tsv", "json", "jsonl"):
        raise UsageError(
            f"--format {output_format} cannot be split into shards; use csv, tsv, json or jsonl"
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

    if len(X) == 0:
        return np.zeros((0, n_classes))
    cuts = [0, *(np.flatnonzero(np.diff(batch_of)) + 1).tolist(), len(X)]
    return np.concatenate([score(X[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])


def remove_part(part: str | Path) -> None:
    Path(part).unlink(missing_ok=True)
    part_sidecar(part).unlink(missing_ok=True)
