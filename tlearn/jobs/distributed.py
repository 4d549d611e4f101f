"""extract and predict as several processes: with --shard I/N one part, under torchrun
every rank its part, merged (extract) or gathered (predict) on rank 0."""

from __future__ import annotations

import dataclasses
import time

import tlearn.jobs.extract as one_extract
import tlearn.jobs.predict as one_predict
from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.system import dist_env
from tlearn.data.imageset import Skipped
from tlearn.jobs.extract import ExtractResult
from tlearn.jobs.predict import Prediction, PredictResult
from tlearn.scale.group import ProcessGroup, raise_first_failure, status_of
from tlearn.scale.merge import MergeResult, merge_parts
from tlearn.scale.shard import Shard, part_path, remove_part


def extract(data, out, *, shard: Shard | None = None, **kwargs):
    """jobs.extract.extract, sharded: with `shard` this process writes that part; under
    torchrun every rank writes its part and rank 0 merges them into `out`. Returns the
    ExtractResult (on rank 0; None on other ranks)."""

    env = dist_env()
    if env is None:
        return one_extract.extract(data, out, shard=shard, **kwargs)
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
            res = one_extract.extract(data, out, shard=mine, **kwargs)
        except Exception as e:
            own = e
        statuses = group.all_gather_json(status_of(own))
        if any(not s["ok"] for s in statuses):
            remove_part(part_path(out, mine))  # nothing final is written
        raise_first_failure(statuses, env.rank, own)

        merged, own = None, None
        if env.rank == 0:
            try:
                merged = _merge_ranks(out, env.world_size)
            except Exception as e:
                own = e
        statuses = group.all_gather_json(status_of(own))
        raise_first_failure(statuses, env.rank, own)
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
    """jobs.predict.predict, sharded: with `shard` only that part of the inputs is predicted
    (result.part describes it); under torchrun each rank predicts its part and rank 0
    gets all predictions in input order. Returns the PredictResult (None on ranks > 0)."""

    env = dist_env()
    if env is None:
        return one_predict.predict(model_dir, inputs, shard=shard, **kwargs)
    if shard is not None:
        raise UsageError("--shard and torchrun both split the inputs; use one of them")
    with ProcessGroup(env) as group:
        kwargs["run"] = group.run_options(kwargs.get("run") or RunOptions())
        res, own = None, None
        try:
            res = one_predict.predict(
                model_dir, inputs, shard=Shard(env.rank, env.world_size), **kwargs
            )
        except Exception as e:
            own = e
        statuses = group.all_gather_json(status_of(own))
        raise_first_failure(statuses, env.rank, own)
        # Predictions are small next to features: gather them on rank 0 instead of writing
        # parts, so predict needs no shared filesystem. Rank 0 renders them like a single run.
        payload = {
            "predictions": [dataclasses.asdict(p) for p in res.predictions],
            "skipped": res.part["skipped"],
        }
        gathered = group.gather_json(payload)
    if env.rank != 0:
        return None
    predictions, skipped = [], [Skipped(*s) for s in res.part["scan_skipped"]]
    for g in gathered:
        predictions += [Prediction(**p) for p in g["predictions"]]
        skipped += [Skipped(*s) for s in g["skipped"]]
    return PredictResult(
        predictions=predictions,
        classes=res.classes,
        score_kind=res.score_kind,
        skipped=skipped,
        warnings=res.warnings,
        decisions=res.decisions,
    )
