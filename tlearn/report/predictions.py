"""Predictions as text a script reads: CSV, TSV, JSON or JSON lines, and which of them an
output file asks for (its extension, unless --format says otherwise)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlearn.core.errors import UsageError

FILE_FORMATS = ("csv", "tsv", "json", "jsonl")
SET_SEPARATOR = ";"  # class names in a prediction set's cell
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


@dataclass
class Layout:
    """Which columns predictions have beyond path, prediction and score (jobs.decide's
    Decisions has the same fields)."""

    multi_label: bool = False
    probability: bool = False  # the calibrated (or the head's own) probability
    set: bool = False  # the conformal prediction set
    ood: bool = False  # ood_score and unknown


PLAIN = Layout()


def prediction_records(
    predictions: Sequence, top_k: int, all_scores: bool, layout: Layout | None = None
) -> list[dict]:
    """One dict per prediction (objects with path, label, score and per-class scores,
    and the fields `layout` names): the best `top_k` classes, and every class's score
    (and probability) with `all_scores`. Multi-label: the labels and every label's
    probability."""
    layout = layout or PLAIN
    records = []
    for p in predictions:
        if layout.multi_label:
            rec = {"path": p.path, "prediction": p.label, "labels": p.labels}
            rec["probabilities"] = p.probabilities
            if all_scores:
                rec["scores"] = p.scores
        else:
            rec = {"path": p.path, "prediction": p.label, "score": p.score}
            if layout.probability:
                rec["probability"] = p.probability
            if layout.set:
                rec["set"] = p.set
        if layout.ood:
            rec["ood_score"] = p.ood_score
            rec["unknown"] = p.unknown
        if layout.multi_label:
            records.append(rec)
            continue
        if top_k > 1:
            ranked = sorted(p.scores.items(), key=lambda kv: -kv[1])[:top_k]
            rec["top_k"] = [{"class": c, "score": s} for c, s in ranked]
        if all_scores:
            rec["scores"] = p.scores
            if layout.probability:
                rec["probabilities"] = p.probabilities
        records.append(rec)
    return records


def csv_header(classes: Sequence[str], k: int, all_scores: bool, layout: Layout) -> list[str]:
    if layout.multi_label:
        header = ["path", "prediction"]
        header += ["ood_score", "unknown"] if layout.ood else []
        header += [f"probability_{c}" for c in classes]
        return header + ([f"score_{c}" for c in classes] if all_scores else [])
    header = ["path", "prediction", "score"]
    header += ["probability"] if layout.probability else []
    header += ["set"] if layout.set else []
    header += ["ood_score", "unknown"] if layout.ood else []
    for i in range(2, k + 1):
        header += [f"top{i}", f"top{i}_score"]
    if all_scores:
        header += [f"score_{c}" for c in classes]
        header += [f"probability_{c}" for c in classes] if layout.probability else []
    return header


def csv_row(r: dict, classes: Sequence[str], all_scores: bool, layout: Layout) -> list[str]:
    def num(v):
        return "" if v is None else f"{v:.6g}"

    if layout.multi_label:
        row = [r["path"], r["prediction"]]
        row += [num(r["ood_score"]), str(r["unknown"]).lower()] if layout.ood else []
        row += [num(r["probabilities"][c]) for c in classes]
        return row + ([num(r["scores"][c]) for c in classes] if all_scores else [])
    row = [r["path"], r["prediction"], num(r["score"])]
    row += [num(r["probability"])] if layout.probability else []
    row += [SET_SEPARATOR.join(r["set"])] if layout.set else []
    row += [num(r["ood_score"]), str(r["unknown"]).lower()] if layout.ood else []
    for t in r.get("top_k", [])[1:]:
        row += [t["class"], num(t["score"])]
    if all_scores:
        row += [num(r["scores"][c]) for c in classes]
        if layout.probability:
            row += [num(r["probabilities"][c]) for c in classes]
    return row


def render_predictions(
    records: list[dict],
    fmt: str,
    classes: Sequence[str],
    k: int,
    all_scores: bool,
    kind: str,
    layout: Layout | None = None,
) -> str:
    """The text of `records` in a file format (FILE_FORMATS); `kind` names the score."""
    layout = layout or PLAIN
    if fmt == "json":
        return json.dumps({"score": kind, "predictions": records}, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if fmt not in ("csv", "tsv"):
        raise UsageError(f"unknown prediction format {fmt!r}; allowed: {', '.join(FILE_FORMATS)}")
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",")
    w.writerow(csv_header(classes, k, all_scores, layout))
    for r in records:
        w.writerow(csv_row(r, classes, all_scores, layout))
    return buf.getvalue()
