"""The cache root's marker: `tlearn cache clear` deletes only a folder tlearn made.

When tlearn creates its cache root it writes CACHEDIR.TAG there (the Cache Directory
Tagging format, so backup tools skip the folder too). `cache clear` refuses a root without
it when $TLEARN_CACHE_DIR chose the root (it may be any folder of the user's); the default
root (~/.cache/tlearn or $XDG_CACHE_HOME/tlearn) is tlearn's by its name, and caches made
there before the marker existed get it on their next write."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tlearn.core.atomic import atomic_file

MARKER = "CACHEDIR.TAG"
TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This folder is a cache made by tlearn (features, exported graphs).\n"
    "# tlearn cache clear deletes its features/, onnx/ and resolved/ folders.\n"
)
ENV = "TLEARN_CACHE_DIR"


def chosen_by_env() -> bool:
    return bool(os.environ.get(ENV))


def is_marked(root: str | Path) -> bool:
    with contextlib.suppress(OSError):
        return (Path(root) / MARKER).read_text(encoding="utf-8").startswith(TAG[:44])
    return False


def ensure_root(root: str | Path) -> Path:
    """Create the cache root if needed, marked as tlearn's when tlearn creates it (or it is
    the default root). Raises OSError like mkdir; callers treat the cache as optional."""
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if (created or not chosen_by_env()) and not is_marked(root):
        with contextlib.suppress(OSError), atomic_file(root / MARKER, "w") as f:
            f.write(TAG)
    return root
