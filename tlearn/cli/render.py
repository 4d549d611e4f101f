"""Output: the stdout/stderr consoles, progress bars, warnings and skipped images, and
the tables several commands print. Everything user-supplied is escaped for rich."""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tlearn.core.deadline import format_duration
from tlearn.core.names import printable

# Wide when piped, so tables in logs are not folded into 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True, soft_wrap=True)  # one message, one line: greppable logs


def progress_bars(quiet: bool):
    """Progress on stderr unless --quiet: bars on a terminal, else (a log, a pipe) a line
    every ~10 s or 10% of each stage (count, rate, ETA)."""
    shown = not quiet and not err.quiet
    return Bars(err, enabled=shown and err.is_terminal, log=shown and not err.is_terminal)


def report_skips(skipped, warnings, quiet: bool) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(printable(w))}", highlight=False)
    if skipped:
        if not quiet:
            for s in skipped[:20]:
                err.print(
                    f"[yellow]skipped[/] {escape(s.path)}: {escape(s.reason)}", highlight=False
                )
            if len(skipped) > 20:
                err.print(f"... and {len(skipped) - 20} more", highlight=False, markup=False)
        err.print(f"[yellow]{len(skipped)} image(s) skipped[/]", highlight=False)


def pct3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def engine_note(engine: dict) -> str:
    if not engine:
        return ""
    if not engine.get("backend"):
        return f" (all {engine.get('cached', 0)} from the feature cache)"
    return (
        f" ({engine['backend']}; {engine.get('computed', 0)} computed, "
        f"{engine.get('cached', 0)} from the feature cache)"
    )


# ----------------------------------------------------------------------------- fit


def print_validation(metrics: dict | None, n_val: int) -> None:
    """After a fit: the per-class table and one summary line (nothing without --val)."""
    if metrics and metrics.get("task") == "multi-label":
        f = {k: "-" if metrics.get(k) is None else f"{metrics[k]:.3f}" for k in
             ("mAP", "micro_f1", "macro_f1", "subset_accuracy")}  # fmt: skip
        out.print(
            f"validation on {n_val} images: mAP {f['mAP']}, micro F1 {f['micro_f1']}, "
            f"macro F1 {f['macro_f1']}, subset accuracy {f['subset_accuracy']}",
            highlight=False,
            markup=False,
        )
    elif metrics:
        out.print(metrics_table(metrics, f"validation on {n_val} images"))
        out.print(
            f"validation accuracy {metrics['accuracy']:.3f}, balanced "
            f"{metrics['balanced_accuracy']:.3f}",
            highlight=False,
            markup=False,
        )


def posthoc_lines(section: dict | None) -> list[str]:
    """What a fit learned after its head (config.json's "calibration"), in words."""
    if not section:
        return []
    lines = []
    prob = section.get("probability")
    if prob and prob.get("method") == "temperature":
        before, after = section.get("nll_before"), section.get("nll_after")
        nll = f", NLL {before:.3f} -> {after:.3f}" if before is not None else ""
        lines.append(
            f"probabilities: temperature {prob['temperature']:.3g} on {section.get('n')} "
            f"held-out images ({section.get('fitted_on', '')}{nll})"
        )
    elif prob:
        lines.append(f"probabilities: Platt scaling per label on {section.get('n')} images")
    if section.get("conformal"):
        lines.append("prediction sets: predict/evaluate --coverage LEVEL (split-conformal)")
    ood = section.get("ood")
    if ood:
        lines.append(
            f"unknown: cosine distance to the nearest of {ood['bank']} training images above "
            f"{ood['threshold']:.4f} ({ood['flag_rate']:.0%} of training images, out-of-fold)"
        )
    return lines


def metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, m in metrics["per_class"].items():
        table.add_row(
            escape(cls), pct3(m["precision"]), pct3(m["recall"]), pct3(m["f1"]), str(m["support"])
        )
    return table


def confusion_table(metrics: dict) -> Table:
    labels = metrics["confusion"]["labels"]
    table = Table(title="confusion (rows: true, columns: predicted)")
    table.add_column("true \\ pred")
    for lab in labels:
        table.add_column(escape(lab), justify="right")
    for lab, row in zip(labels, metrics["confusion"]["matrix"], strict=True):
        table.add_row(escape(lab), *[str(v) for v in row])
    return table


# ----------------------------------------------------------------------------- sweep


def sweep_table(res, title: str) -> Table:
    table = Table(title=title)
    cv = f"CV {getattr(res, 'metric', 'accuracy')}"
    for col in ("layer", "dim", "output C x H x W", "GFLOPs", cv, "C", "fit s"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    chosen = getattr(res, "chosen", None) or res.best  # fit --layer auto may take a pair
    for r in res.rows:
        mark = " *" if r.layers == chosen.layers else ""
        table.add_row(
            escape(f"{r.name}{mark}"),
            str(r.feature_dim),
            " x ".join(map(str, r.shape)) if r.shape else "",
            f"{r.gflops:.3f}",
            f"{r.cv_mean:.3f} +- {r.cv_std:.3f}",
            f"{r.C:g}",
            f"{r.fit_seconds:.2f}",
        )
    for r in res.pairs:
        table.add_row(
            escape(
                f"{r.name}{' (best pair)' if r is res.best_pair else ''}"
                f"{' *' if r.layers == chosen.layers else ''}"
            ),
            str(r.feature_dim),
            "pair",
            f"{r.gflops:.3f}",
            f"{r.cv_mean:.3f} +- {r.cv_std:.3f}",
            f"{r.C:g}",
            f"{r.fit_seconds:.2f}",
        )
    return table


def sweep_summary(res) -> list[str]:
    b, cv = res.best, f"CV {getattr(res, 'metric', 'accuracy')}"
    lines = [
        f"recommended cut: --layer {b.name} ({cv} {b.cv_mean:.3f} +- {b.cv_std:.3f}, "
        f"{b.feature_dim} features, {b.gflops:.3f} GFLOPs)"
    ]
    p = res.best_pair
    if p is not None:
        gain = p.cv_mean - b.cv_mean
        lines.append(
            f"best pair: --layer {p.name} ({cv} {p.cv_mean:.3f} +- {p.cv_std:.3f}, "
            f"{gain:+.3f} vs the recommended single layer, {p.feature_dim} features)"
        )
    return lines


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class LogLines:
    """Progress for logs: a counted stage prints a line every `every_s` seconds or `step`
    of the way and one when it ends (count, rate, ETA); a phase without a count (total
    0: loading, exporting) prints nothing if it is quick, and a heartbeat thread says
    "still ..." every `every_s` seconds while anything runs silently, so a log never
    goes quiet for longer than that."""

    def __init__(self, console, every_s: float = 10.0, step: float = 0.1, clock=time.monotonic):
        self.console, self.every_s, self.step, self.clock = console, every_s, step, clock
        self.stages: dict[str, dict] = {}
        self.current: str | None = None
        self.last_line = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="tlearn-log")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                now = self.clock()
                if self.current is None or now - self.last_line < self.every_s:
                    continue
                s = self.stages[self.current]
                self._print(f"{self.current} ... still running ({now - s['t0']:.0f}s)", now)

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        with self._lock:
            self._update(stage, done, total, info)

    def _update(self, stage: str, done: int, total: int, info: str) -> None:
        now = self.clock()
        s = self.stages.get(stage)
        if s is None:
            s = self.stages[stage] = {"t0": now, "last": None, "bucket": -1}
        self.current = stage
        if total <= 0:
            return  # a phase: the heartbeat speaks if it lasts
        bucket = done * round(1 / self.step) // total  # integers: 30% is 30%, not 29.99%
        finished = done >= total
        due = s["last"] is None or now - s["last"] >= self.every_s or bucket > s["bucket"]
        if not (due or finished) or s.get("finished"):
            return
        s["last"], s["bucket"], s["finished"] = now, bucket, finished
        if finished:
            self.current = None
        elapsed = now - s["t0"]
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 and not finished else None
        parts = [f"{stage}: {done}/{total} ({100 * done / total:.0f}%)"]
        if elapsed > 0 and done:
            parts.append(f"{rate:.1f}/s")
        parts.append(f"{elapsed:.0f}s" if finished else (f"ETA {eta:.0f}s" if eta else ""))
        self._print(", ".join(p for p in parts if p) + (f" | {info}" if info else ""), now)

    def _print(self, line: str, now: float) -> None:
        self.last_line = now
        self.console.print(escape(line), highlight=False, soft_wrap=True)


class Bars:
    """One bar per stage while `enabled` (a terminal, not --quiet), or lines for a log
    with `log` (LogLines). Called as the library's progress callback: (stage, done,
    total). With `info`, a text column after the bar that `update(task, info=...)` fills
    (training: loss and accuracy)."""

    def __init__(self, console, enabled: bool, info: bool = False, log: bool = False):
        self.console = console
        self.enabled = enabled
        self.info = info
        self.progress = None
        self.tasks: dict[str, int] = {}
        self.lines = LogLines(console) if log and not enabled else None

    def __enter__(self):
        if self.lines is not None:
            self.lines.start()
        if self.enabled:
            info = TextColumn("{task.fields[info]}", markup=False)
            last = info if self.info else TimeRemainingColumn()
            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                last,
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.lines is not None:
            self.lines.stop()
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def add(self, description: str, total: int) -> int:
        fields = {"info": ""} if self.info else {}
        return self.progress.add_task(description, total=total, **fields)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.lines is not None:
            self.lines(stage, done, total)
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.add(stage, total or None)  # 0: a phase, no count
        self.progress.update(self.tasks[stage], completed=done, total=total or None)


def estimate_line(data: dict) -> str:
    """The "estimate" event of a neural run, as one line."""
    if data.get("phase") == "head only":
        return (
            f"estimate: about {format_duration(data['epoch_seconds'])} per head-only epoch, "
            f"{format_duration(data['total_seconds'])} for {data['epochs']} "
            f"({data['images_per_s']:.0f} img/s measured on {data['batches']} batches); the "
            "epochs that also train the backbone are measured when they start"
        )
    line = (
        f"estimate: about {format_duration(data['epoch_seconds'])} per epoch, "
        f"{format_duration(data['total_seconds'])} for {data['epochs']} epoch(s) "
        f"({data['images_per_s']:.0f} img/s measured on {data['batches']} batches)"
    )
    if data.get("limit_seconds") is not None:
        line += (
            f"; the time limit {format_duration(data['limit_seconds'])} leaves room for "
            f"about {data['epochs_in_limit']}"
        )
    if data.get("shortened_to"):
        line += f": shortening the run to {data['shortened_to']} epoch(s), schedule re-planned"
    return line
