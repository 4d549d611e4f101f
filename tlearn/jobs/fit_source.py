"""What every `fit` of a linear head (one class per image, or label sets) does before
any image is read: option checks that need no backbone, the output directory check,
and the feature source (one cut, or every candidate layer for --layer auto)."""

from __future__ import annotations

from pathlib import Path

from tlearn.cache.remembered import check_layers
from tlearn.cache.store import cache_root
from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import is_auto_layer
from tlearn.data.split import check_val_split
from tlearn.features.table import is_features_table
from tlearn.jobs.sources import FeatureSource


def fit_source(
    out_dir,
    data,
    *,
    model: str,
    weights: str,
    layers,
    pool: str,
    run: RunOptions,
    seed: int,
    head: str,
    C: float | None,
    val,
    val_split: float | None,
    force: bool,
) -> tuple[Path, FeatureSource, bool]:
    """(the checked output directory, the feature source, whether it is --layer auto)."""
    if val is not None and val_split is not None:
        raise UsageError("use either --val or --val-split, not both")
    if val_split is not None:
        check_val_split(val_split)
    auto = is_auto_layer(layers)
    if not auto and not is_features_table(data):
        check_layers(cache_root(), model, layers)  # before torch loads, when known
    out_dir = check_output_parent(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")
    if auto:
        # --layer auto loads the backbone (torch): only then
        from tlearn.jobs.layer_auto import AutoLayerSource

        # one pass extracts every candidate layer; `choose` keeps the best (CV on train)
        return out_dir, AutoLayerSource(model, weights, pool, run, seed, head=head, C=C), True
    return out_dir, FeatureSource(model, weights, layers, pool, run, seed), False
