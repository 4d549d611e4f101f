"""Cut points of the backbones tlearn bundles weights for, so that --layer and
--freeze-to are checked before torch and timm load (a run that fails on a typo fails in
under a second). tests/test_fail_fast.py keeps these equal to timm's.
Other models are checked with the list a previous run remembered (cache.remembered)."""

from __future__ import annotations


def _efficientnet_lite(depths: tuple[int, ...]) -> tuple[str, ...]:
    """Every cut point of timm's tf_efficientnet_lite* with `depths` blocks per stage."""
    names = ["conv_stem", "bn1", "blocks"]
    for stage, depth in enumerate(depths):
        names.append(f"blocks.{stage}")
        names += [f"blocks.{stage}.{block}" for block in range(depth)]
    return (*names, "conv_head", "bn2", "global_pool", "classifier")


# timm's feature stages (feature_info) of the lite family
_LITE_STAGES = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")

# model -> (every cut point, timm's feature stages)
KNOWN_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tf_efficientnet_lite0": (_efficientnet_lite((1, 2, 2, 3, 3, 4, 1)), _LITE_STAGES),
    "tf_efficientnet_lite1": (_efficientnet_lite((1, 3, 3, 4, 4, 5, 1)), _LITE_STAGES),
    "tf_efficientnet_lite2": (_efficientnet_lite((1, 3, 3, 4, 4, 5, 1)), _LITE_STAGES),
}
