"""Predictions as text a script reads: CSV, TSV, JSON or JSON lines, and which of them an
output file asks for (its extension, unless --format says otherwise)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from tlearn.core.errors import UsageError

FILE_FORMATS = ("csv", "tsv", "json", "jsonl")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def choose_format(output: str | Path | None, fmt: str | None, terminal: bool) -> str:
    """The format to write. No -o (or -o -): --format, else a table on a terminal and CSV
    when piped. -o FILE: --format, else the file's extension (.csv .tsv .json .jsonl),
    else CSV; a --format that contradicts the extension is refused."""
    to_stdout = output is None or str(output) == "-"
    if to_stdout:
        return fmt or ("table" if terminal and output is None else "csv")
    suffix = Path(output).suffix.lower()
    inferred = EXTENSIONS.get(suffix)
    if fmt == "table":
        raise UsageError(
            f"--format table is for the terminal; -o {output} takes csv, tsv, json or jsonl"
        )
    if fmt is not None and inferred is not None and fmt != inferred:
        raise UsageError(
            f"-o {output} ends in {suffix}, which means {inferred}, but --format is {fmt}; "
            f"drop --format or name the file *.{fmt}"
        )
    return fmt or inferred or "csv"


def prediction_records(predictions: Sequence, top_k: int, all_scores: bool) -> list[dict]:
    """One dict per prediction (objects with path, label, score and per-class scores):
    the best `top_k` classes, and every class's score with `all_scores`."""
    records = []
    for p in predictions:
        rec = {"path": p.path, "prediction": p.label, "score": p.score}
        if top_k > 1:
            ranked = sorted(p.scores.items(), key=lambda kv: -kv[1])[:top_k]
            rec["top_k"] = [{"class": c, "score": s} for c, s in ranked]
        if all_scores:
            rec["scores"] = p.scores
        records.append(rec)
    return records


def render_predictions(
    records: list[dict], fmt: str, classes: Sequence[str], k: int, all_scores: bool, kind: str
) -> str:
    """The text of `records` in a file format (FILE_FORMATS); `kind` names the score."""
    if fmt == "json":
        return json.dumps({"score": kind, "predictions": records}, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if fmt not in ("csv", "tsv"):
        raise UsageError(f"unknown prediction format {fmt!r}; allowed: {', '.join(FILE_FORMATS)}")
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",")
    header = ["path", "prediction", "score"]
    for i in range(2, k + 1):
        header += [f"top{i}", f"top{i}_score"]
    if all_scores:
        header += [f"score_{c}" for c in classes]
    w.writerow(header)
    for r in records:
        row = [r["path"], r["prediction"], f"{r['score']:.6g}"]
        for t in r.get("top_k", [])[1:]:
            row += [t["class"], f"{t['score']:.6g}"]
        if all_scores:
            row += [f"{r['scores'][c]:.6g}" for c in classes]
        w.writerow(row)
    return buf.getvalue()
