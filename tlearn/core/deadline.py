"""--time-limit: parsing a duration strictly, and the deadline a run checks at its
natural stopping points (an epoch boundary, a C of the grid, a candidate layer).

`now` is the one clock every deadline reads; tests replace it to make stopping
deterministic instead of timing real work."""

from __future__ import annotations

import math
import re
import time

from tlearn.core.errors import UsageError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smh])")


def now() -> float:
    return time.monotonic()


def parse_duration(text: str) -> float:
    """'90s', '30m', '1.5h', '1h30m' -> seconds (positive). Anything else: a UsageError
    naming the value and the accepted forms."""
    s = str(text).strip().lower()
    hint = "use a number with a unit s, m or h, e.g. 90s, 30m, 1h or 1h30m"
    pos, total, units = 0, 0.0, []
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * UNITS[m.group(2)]
        units.append(m.group(2))
        pos = m.end()
    if not s or pos != len(s):
        raise UsageError(f"--time-limit '{text}': {hint}")
    if len(set(units)) != len(units):
        raise UsageError(f"--time-limit '{text}': each unit at most once; {hint}")
    if not math.isfinite(total) or total <= 0:
        raise UsageError(f"--time-limit '{text}': must be longer than zero; {hint}")
    return total


def format_duration(seconds: float) -> str:
    """A short human duration: 42s, 3m 05s, 1h 02m."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


class Deadline:
    """A time limit started now (by the caller, when the command starts)."""

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds = float(seconds)
        self.start = now() if start is None else start

    def elapsed(self) -> float:
        return now() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def passed(self) -> bool:
        return self.left() <= 0

    def describe(self) -> str:
        return format_duration(self.seconds)
