"""File names that are not UTF-8. On Linux a name is bytes; Python holds bytes that are not
UTF-8 as surrogate escapes, which cannot be written as UTF-8 text (CSV, JSON, Parquet, the
terminal). tlearn skips such files (reason NOT_UTF8) and shows their names with each byte
that is not UTF-8 as a backslash escape `\\xNN` (`printable`), the same everywhere."""

from __future__ import annotations

NOT_UTF8 = "file name is not valid UTF-8; rename it (e.g. with convmv)"


def is_utf8(text: str) -> bool:
    """True when `text` can be written as UTF-8 (no surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` as valid UTF-8: each undecodable byte of a file name as `\\xNN` (b'\\xff.jpg'
    -> '\\\\xff.jpg'); text that is UTF-8 already comes back unchanged."""
    if is_utf8(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the file name's own bytes
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
