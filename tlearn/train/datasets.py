"""The training and validation image sets a fine-tuning run reads, and their
fingerprint (a checkpoint resumes only on the same images, and every torchrun rank must
see the same ones)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tlearn.core.errors import DataError, UsageError
from tlearn.data.imageset import ImageSet
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset, scan_class_folders
from tlearn.data.split import stratified_split
from tlearn.features.table import is_features_table


def data_fingerprint(train: ImageSet, val: ImageSet | None) -> str:
    h = hashlib.sha256()
    for s in (train, val):
        if s is not None:
            h.update(json.dumps([s.paths, s.labels, s.classes]).encode())
    return h.hexdigest()


def _split_images(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    tr, va = stratified_split(images.labels, fraction, seed)
    return images.subset(tr.tolist()), images.subset(va.tolist())


def load_datasets(
    data, *, val=None, val_split=None, labels_csv=None, seed: int = 0
) -> tuple[ImageSet, ImageSet | None]:
    """Training images and (optional) validation images, labels on the train classes."""
    if val is not None and val_split is not None:
        raise UsageError("use either --val DIR or --val-split, not both")
    if data is not None and is_features_table(data):
        raise UsageError(
            f"{data} is a features table: neural heads train from images (their backbone may "
            "train); use --head svm|logreg for features tables"
        )
    found_val = None
    if labels_csv is not None:
        train = read_labels_csv(labels_csv)
    else:
        if data is None or not Path(data).is_dir():
            raise DataError(f"{data} is not a folder of class sub-folders")
        train, found_val = resolve_dataset(data)
    if len(train) == 0:
        raise DataError(f"no images found in {data}")
    if len(train.classes) < 2:
        raise DataError(
            f"fit needs at least two classes with images; found {len(train.classes)} "
            f"({', '.join(train.classes) or 'none'})"
        )
    valid = None
    if val is not None:
        if not Path(val).is_dir():
            raise DataError(f"--val {val}: not a folder of class sub-folders")
        valid = scan_class_folders(val, classes=train.classes)
    elif val_split is not None:
        if found_val is not None:
            train = train.concat(found_val)
        train, valid = _split_images(train, val_split, seed)
    else:
        valid = found_val
    return train, valid
