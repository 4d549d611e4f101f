"""Every hash tlearn computes: canonical JSON documents (cache keys, sidecars) and file
contents (weights, images), so that two places never hash the same thing two ways."""

from __future__ import annotations

import hashlib
import json
import os


def doc_sha256(doc: dict) -> str:
    """sha256 of a JSON document in canonical form: the one way cache keys are made."""
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def content_key(data: bytes) -> bytes:
    """The feature cache's key of an image: sha256 of its bytes (32-byte digest)."""
    return hashlib.sha256(data).digest()


def file_key(path: str | os.PathLike) -> bytes:
    """sha256 digest of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def file_sha256(path: str | os.PathLike) -> str:
    """file_key as hex: how weights files are identified in specs and sidecars."""
    return file_key(path).hex()
