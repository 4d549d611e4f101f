"""`tlearn extract`: features of every readable image to a table, unreadable images to
OUTPUT.skipped.csv, an interrupted run continued with --resume, one shard with --shard."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import DataError, NothingReadError, UsageError
from tlearn.core.hashing import inputs_sha256
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL, FLATTEN_WARN_DIM
from tlearn.core.stages import MODEL, STARTUP
from tlearn.core.system import process_age
from tlearn.data.image import header_problem
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.scan import load_images
from tlearn.data.skipped import (
    nothing_read,
    require_some_read,
    skipped_path,
    strict_failure,
    write_skipped_csv,
)
from tlearn.features.engine import CutRequest, open_engine
from tlearn.features.stream import FeatureBatch
from tlearn.features.table import feature_meta, kept_rows, table_format, write_table
from tlearn.scale.shard import Shard, finish_features_part, plan_part

# ----------------------------------------------------------------------------- extract


@dataclass
class ExtractResult:
    rows: int
    feature_dim: int
    out: str
    skipped: list[Skipped]
    warnings: list[str]
    seconds: float
    engine: dict = field(default_factory=dict)  # backend, device, cached, computed, stages
    format: str = "csv"  # of the table written (csv when to stdout)
    # start-up: process start (imports, model, warm-up) to the first image read; run: from
    # then to the last row written (what images/s are measured over)
    startup_seconds: float | None = None
    run_seconds: float | None = None

    def summary(self) -> dict:
        """What `extract --json` prints."""
        rate = self.rows / self.run_seconds if self.run_seconds else None
        return {
            "rows": self.rows,
            "feature_dim": self.feature_dim,
            "out": self.out,
            "format": self.format,
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 4),
            "startup_seconds": _round(self.startup_seconds),
            "run_seconds": _round(self.run_seconds),
            "images_per_second": _round(rate, 1),
            "engine": self.engine,
            "warnings": self.warnings,
        }


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def _counted(batches, read: list[int]):
    """The batches, adding their rows to read[0] as they pass."""
    for b in batches:
        read[0] += len(b.indices)
        yield b


def _scan(data, labels_csv, multi_label: bool, strict_now: bool, listed) -> ImageSet:
    """The images to extract. Every one skipped at scan time: exit 3, their list written to
    `listed`. With `strict_now` (--strict -o -), a problem the scan finds fails before any
    row reaches stdout; a file output lists decode failures too before failing."""
    try:
        images = load_images(data, labels_csv, multi_label=multi_label)
    except NothingReadError as e:
        raise nothing_read(e.where, e.skipped, listed) from None
    if len(images) == 0:
        raise DataError(f"no images found in {labels_csv or ', '.join(map(str, data))}")
    if strict_now:
        # stdout cannot be taken back: a file that is plainly no image fails before any row
        found = [Skipped(p, why) for p in images.paths if (why := header_problem(p))]
        if images.skipped or found:
            raise strict_failure(list(images.skipped) + found)
    return images


def extract(
    data: Sequence[str | Path],
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] | None = None,
    pool: str = "avg",
    labels_csv: str | Path | None = None,
    strict: bool = False,
    resume: bool = False,
    run: RunOptions | None = None,
    shard: Shard | None = None,
    multi_label: bool = False,
) -> ExtractResult:
    """Features of every readable image to a table (CSV, Parquet or NPY by the extension
    of `out`; CSV on stdout for "-"). Unreadable images are listed in OUTPUT.skipped.csv
    (named in the sidecar); with `strict` any of them fails the run and nothing is
    written. With `resume`, rows of an interrupted run's partial file are kept.
    With `shard`, only that shard's images go to the part file OUT.part-I-of-N, whose
    sidecar lists its unreadable images (see tlearn.shard; `merge` joins the parts)."""
    run = run or RunOptions()
    t0 = time.perf_counter()
    if str(out) != "-":
        check_output_parent(out)
    if multi_label and labels_csv is None:
        raise UsageError("--multi-label reads label sets from --labels FILE (labels joined by ';')")
    to_stdout = str(out) == "-"
    where = labels_csv if labels_csv is not None else ", ".join(map(str, data))
    listed = None if to_stdout or shard is not None else skipped_path(out)
    images = _scan(data, labels_csv, multi_label, strict and to_stdout, listed)
    if resume and to_stdout:
        raise UsageError("--resume needs an output file, not -o -")
    if shard is not None and to_stdout:
        raise UsageError("--shard needs an output file, not -o -: each shard writes a part")
    fmt = table_format(out)  # of OUT, also for its parts OUT.part-I-of-N
    t_model = time.perf_counter()
    engine = open_engine(CutRequest(model, weights, layers, pool), run)
    spec, data_config = engine.spec, engine.data_config
    dim = engine.feature_dim()
    engine.stages.add(MODEL, time.perf_counter() - t_model)
    warnings = list(images.warnings)
    if pool == "flatten" and dim > FLATTEN_WARN_DIM:
        warnings.append(
            f"--pool flatten gives {dim} features per image; the table will be large "
            "(avg or catavgmax pooling keep it small)"
        )
    meta = feature_meta(spec, data_config, dim)
    labels = images.label_names if images.labels is not None else None
    inputs = inputs_sha256(images.paths, labels)
    part, lo, hi = None, 0, len(images)
    if shard is not None:
        part = plan_part(shard, images.paths, labels, images.skipped, run.batch_size)
        out, lo, hi, meta = part.path(out), part.start, part.stop, {**meta, "shard": part.info()}
    elif not to_stdout:
        meta = {**meta, "skipped_csv": skipped_path(out).name}
    kept = kept_rows(out, meta, fmt=fmt, inputs_sha256=inputs) if resume and not to_stdout else []
    done = {p for p, _ in kept}
    if part is not None:
        part.check_resume(done, images.paths)
    elif done - set(images.paths):
        raise DataError(
            f"{out}.partial holds images that are not among the inputs; run without --resume"
        )
    todo = [i for i in range(lo, hi) if images.paths[i] not in done]
    skipped = list(images.skipped)
    engine.warm_up(run, len(todo))
    t_run = time.perf_counter()
    age = process_age()
    engine.stages.add(STARTUP, age if age is not None else t_run - t0)
    batches = engine.stream([images.paths[i] for i in todo], run, stage="extract", skipped=skipped)
    # iter_features numbers images within `todo`; map back to positions in `images`.
    batches = (FeatureBatch([todo[i] for i in b.indices], b.features) for b in batches)
    read = [len(kept)]  # rows in the table so far (kept by --resume, then new ones)

    def check_strict():
        if strict and skipped:
            raise strict_failure(skipped)

    def before_commit():  # the list is complete and on disk before the output appears
        check_strict()
        if part is None:  # not one image read: no table, only the list (exit 3)
            require_some_read(read[0], skipped, where, skipped_path(out))
            write_skipped_csv(skipped_path(out), skipped)

    rows = write_table(
        _counted(batches, read),
        images.paths,
        labels,
        out,
        meta,
        fmt=fmt,
        kept=kept,
        expected=len(todo),
        inputs_sha256=inputs,
        before_commit=before_commit,
        stages=engine.stages,
    )
    run_seconds = time.perf_counter() - t_run
    if to_stdout:
        check_strict()
        require_some_read(rows, skipped, where)  # nothing was written to stdout
    elif part is not None:
        finish_features_part(out, skipped[len(images.skipped) :])
    return ExtractResult(
        rows=rows,
        feature_dim=dim,
        out=str(out),
        skipped=skipped,
        warnings=warnings + engine.notes,
        seconds=time.perf_counter() - t0,
        engine=engine.summary(),
        format="csv" if to_stdout else fmt.name,
        startup_seconds=age if age is not None else t_run - t0,
        run_seconds=run_seconds,
    )
