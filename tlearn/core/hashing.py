"""Every hash tlearn computes: canonical JSON documents (cache keys, sidecars), file
contents (weights, images) and ordered input lists, so that two places never hash the
same thing two ways."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence


def inputs_sha256(paths: Sequence[str], labels: Sequence[str | None] | None) -> str:
    """Identity of the ordered input list (paths and their labels, if any)."""
    text = json.dumps({"paths": list(paths), "labels": None if labels is None else list(labels)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def blake2b_hex(data: bytes) -> str:
    """Checksum of bytes tlearn wrote and reads back (cache shards, cached graphs)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def file_blake2b(path: str | os.PathLike) -> str:
    """blake2b_hex of a file's content, read in 1 MiB chunks."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
