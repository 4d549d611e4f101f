"""Errors the library raises. Only the cli package turns them into exit codes and messages."""

from __future__ import annotations


class TlearnError(Exception):
    """Base class: a problem the user can fix. The message is one line that says
    what was wrong, what is allowed and how to fix it."""

    exit_code = 1


class UsageError(TlearnError):
    """A bad option value or combination that the parser could not catch."""

    exit_code = 2


class DataError(TlearnError):
    """Image folders, label files or feature files that cannot be used."""


class ImageLoadError(DataError):
    """One image could not be read. `reason` is short, for skipped.csv."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class StrictModeError(DataError):
    """--strict and some images could not be read."""

    exit_code = 3


class NothingReadError(DataError):
    """Not one input image could be read: every one was skipped (decode failures, zero-byte
    files, unknown formats, names that are not UTF-8). Exit 3, as under --strict, with
    or without it. `listed_in`: the skipped list written for this run, if any."""

    exit_code = 3

    def __init__(self, where, skipped, listed_in=None):
        self.where, self.skipped, self.listed_in = str(where), list(skipped), listed_in
        first = self.skipped[0]
        listed = f"; the list is in {listed_in}" if listed_in is not None else ""
        super().__init__(
            f"nothing could be read: all {len(self.skipped)} image(s) in {where} were "
            f"skipped (first: {first.path}: {first.reason}){listed}; nothing written"
        )


class ModelError(TlearnError):
    """Unknown architecture, unknown layer, or weights that cannot be had."""


class WeightsError(ModelError):
    """Pretrained weights are unavailable or do not match the architecture."""


class OutputError(TlearnError):
    """An output path that cannot be written (e.g. its folder does not exist)."""


class ArtifactError(TlearnError):
    """A model directory that is missing, invalid, or would be overwritten."""
