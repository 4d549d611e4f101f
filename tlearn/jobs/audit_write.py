"""The report of `tlearn audit`: one CSV per finding, contact sheets and audit.json.

- duplicates.csv: one pair per row (both paths, splits and labels, the similarity),
  leakage across train/val first;
- label_issues.csv: one image per row, most likely mislabelled first, with the given
  and the suggested label and their out-of-fold probabilities: first those confident
  learning flags (confident_learning = yes), then the other images the out-of-fold
  model assigns to another class;
- outliers.csv: one image per row, least like its class first;
- class_balance.csv, skipped.csv (unreadable files), audit.json (everything above as
  counts plus the first rows of each list);
- duplicates.png, label_issues.png, outliers.png: each finding's images side by side.
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tlearn.core.atomic import atomic_file, write_json
from tlearn.data.skipped import SKIPPED_CSV, write_skipped_csv
from tlearn.report.plots import plot_contact_sheet

SHEET_PAIRS = 12  # duplicate pairs on the contact sheet (one pair per row)
SHEET_IMAGES = 16  # label issues / outliers on their contact sheets
JSON_ROWS = 20  # rows of each finding in audit.json and --json


def duplicate_rows(res) -> list[dict]:
    return [
        {
            "leak": res.splits[p.a] != res.splits[p.b],
            "kind": p.kind,
            "similarity": round(p.similarity, 6),
            "split_a": res.splits[p.a],
            "path_a": res.paths[p.a],
            "label_a": res.classes[res.labels[p.a]],
            "split_b": res.splits[p.b],
            "path_b": res.paths[p.b],
            "label_b": res.classes[res.labels[p.b]],
        }
        for p in res.duplicates
    ]


def issue_rows(res) -> list[dict]:
    return [
        {
            "rank": n + 1,
            "path": res.paths[i.row],
            "split": res.splits[i.row],
            "given": res.classes[i.given],
            "suggested": res.classes[i.suggested],
            "given_probability": round(i.given_probability, 6),
            "suggested_probability": round(i.suggested_probability, 6),
            "confident_learning": "yes" if i.confident else "no",
        }
        for n, i in enumerate(res.issues)
    ]


def outlier_rows(res) -> list[dict]:
    return [
        {
            "rank": n + 1,
            "path": res.paths[o.row],
            "split": res.splits[o.row],
            "label": res.classes[res.labels[o.row]],
            "distance": round(o.distance, 6),
            "iqrs_above_median": round(o.excess, 3),
        }
        for n, o in enumerate(res.outliers)
    ]


def summary(res, rows: int = JSON_ROWS) -> dict:
    """The audit as a JSON-able dict: counts, and the first `rows` rows of each finding."""
    dups = duplicate_rows(res)
    return {
        "n_images": len(res.paths),
        "classes": res.classes,
        "class_balance": res.balance,
        "unreadable": [{"path": s.path, "reason": s.reason} for s in res.unreadable],
        "duplicates": {
            "threshold": res.threshold,
            "pairs": len(dups),
            "exact": sum(d["kind"] == "exact" for d in dups),
            "near": sum(d["kind"] == "near" for d in dups),
            "leakage": res.leakage,
            "truncated": res.duplicates_truncated,
            "first": dups[:rows],
        },
        "label_issues": {
            "count": len(res.issues),
            "confident_learning": sum(i.confident for i in res.issues),
            "cv": res.cv,
            "first": issue_rows(res)[:rows],
        },
        "outliers": {"count": len(res.outliers), "first": outlier_rows(res)[:rows]},
        "engine": res.engine,
        "files": [str(f) for f in res.files],
        "warnings": res.warnings,
    }


def _write_csv(path: Path, rows: list[dict], header: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    return path


DUPLICATE_COLUMNS = [
    "leak",
    "kind",
    "similarity",
    "split_a",
    "path_a",
    "label_a",
    "split_b",
    "path_b",
    "label_b",
]
ISSUE_COLUMNS = [
    "rank",
    "path",
    "split",
    "given",
    "suggested",
    "given_probability",
    "suggested_probability",
    "confident_learning",
]
OUTLIER_COLUMNS = ["rank", "path", "split", "label", "distance", "iqrs_above_median"]


def write_report(res) -> list[Path]:
    """Write every file of the report into res.out_dir; returns their paths."""
    out = res.out_dir
    out.mkdir(parents=True, exist_ok=True)
    dups, issues, outs = duplicate_rows(res), issue_rows(res), outlier_rows(res)
    files = [
        _write_csv(out / "duplicates.csv", dups, DUPLICATE_COLUMNS),
        _write_csv(out / "label_issues.csv", issues, ISSUE_COLUMNS),
        _write_csv(out / "outliers.csv", outs, OUTLIER_COLUMNS),
        _write_csv(out / "class_balance.csv", res.balance, ["class", "train", "val", "share"]),
        write_skipped_csv(out / SKIPPED_CSV, res.unreadable),
    ]
    files += _contact_sheets(out, dups, issues, outs)
    res.files = files + [out / "audit.json"]
    write_json(out / "audit.json", summary(res))
    return res.files


def _contact_sheets(out: Path, dups, issues, outs) -> list[Path]:
    pairs = []
    for n, d in enumerate(dups[:SHEET_PAIRS], start=1):
        what = "LEAK " if d["leak"] else ""
        for side in ("a", "b"):
            pairs.append(
                {
                    "path": d[f"path_{side}"],
                    "caption": f"{n}{side}: {what}{d['kind']} {d['similarity']:.3f}\n"
                    f"{d[f'split_{side}']}/{d[f'label_{side}']} {Path(d[f'path_{side}']).name}",
                }
            )
    issue_items = [
        {
            "path": r["path"],
            "caption": f"{r['rank']}: {Path(r['path']).name}\ngiven {r['given']} "
            f"({r['given_probability']:.2f}), suggested {r['suggested']}",
        }
        for r in issues[:SHEET_IMAGES]
    ]
    outlier_items = [
        {
            "path": r["path"],
            "caption": f"{r['rank']}: {Path(r['path']).name}\n{r['split']}/{r['label']}, "
            f"distance {r['distance']:.3f}",
        }
        for r in outs[:SHEET_IMAGES]
    ]
    return [
        plot_contact_sheet(
            pairs,
            out / "duplicates.png",
            f"{min(len(dups), SHEET_PAIRS)} of {len(dups)} duplicate pairs (leakage first)",
            columns=2,
            empty="no duplicates",
        ),
        plot_contact_sheet(
            issue_items,
            out / "label_issues.png",
            f"{len(issue_items)} of the {len(issues)} images in label_issues.csv "
            "(most likely mislabelled first)",
            empty="no likely label errors",
        ),
        plot_contact_sheet(
            outlier_items,
            out / "outliers.png",
            f"{len(outlier_items)} of {len(outs)} outliers (least like their class first)",
            empty="no outliers",
        ),
    ]
