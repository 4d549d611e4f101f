"""Label sets of multi-label data: labels joined by ';' in one cell ("" = no label)."""

from __future__ import annotations

from collections.abc import Sequence

SEPARATOR = ";"


def parse_label_set(text: str | None) -> tuple[str, ...]:
    """'b; a;' -> ('a', 'b'): the labels of one cell, sorted, without blanks or repeats."""
    if text is None:
        return ()
    return tuple(sorted({p.strip() for p in str(text).split(SEPARATOR) if p.strip()}))


def join_labels(labels: Sequence[str]) -> str:
    return SEPARATOR.join(labels)
