"""`tlearn merge`: check that parts belong to one run and cover it exactly (and that each
part is the table its sidecar describes: rows and sha256), then join them into the output
one process writes (a features table + sidecar in the parts' format, or predictions)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.core.atomic import atomic_file, check_output_parent, read_json
from tlearn.core.errors import DataError, UsageError
from tlearn.data.imageset import Skipped
from tlearn.data.skipped import skipped_path, write_skipped_csv
from tlearn.features.table import SIDECAR_ONLY, merge_tables
from tlearn.scale.shard import PREDICTIONS_FORMAT, Shard, part_path, part_sidecar

# ----------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    kind: str  # "features" or "predictions"
    out: str
    parts: int
    rows: int
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)


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
    meta = read_json(side, DataError)
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
        if key == "shard" or key in SIDECAR_ONLY:
            continue
        if a.get(key) != b.get(key):
            return _META_NAMES.get(key, f"'{key}'")
    return None


def merge_parts(paths: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Join checked parts in input order into `out` (atomically), as a single process
    would have written it: a features table + sidecar, or predictions; OUT.skipped.csv
    beside."""
    parts = check_parts(paths)
    out = check_output_parent(out)
    if any(out.resolve() == p.path.resolve() for p in parts):
        raise UsageError(f"-o {out} is one of the parts; choose the final output name")
    first = parts[0]
    kind = "predictions" if first.meta.get("format") == PREDICTIONS_FORMAT else "features"
    skipped = [Skipped(*s) for s in first.shard["scan_skipped"]]
    for p in parts:
        skipped += [Skipped(*s) for s in p.shard["skipped"]]
    write_skipped_csv(skipped_path(out), skipped)  # complete before the output appears
    warnings: list[str] = []
    if kind == "features":
        extra = {"skipped_csv": skipped_path(out).name}  # as the single run's sidecar says
        _, warnings = merge_tables([(p.path, p.meta) for p in parts], out, extra)
    else:
        _merge_predictions(parts, out)
    rows = sum(int(p.meta["rows"]) for p in parts)
    return MergeResult(
        kind=kind, out=str(out), parts=len(parts), rows=rows, skipped=skipped, warnings=warnings
    )


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
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        header = None
        body = []
        for text, name in zip(texts, names, strict=True):
            buf = io.StringIO(text, newline="")
            next(
                csv.reader(buf, delimiter=delimiter), None
            )  # csv-aware: a class name may be quoted
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
    raise DataError(f"cannot merge predictions in format {fmt!r}; use csv, tsv, json or jsonl")
