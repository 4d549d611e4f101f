"""Extract tlearn features with Ray Data, for users who already run Ray.

    pip install "ray[data]"
    python docs/ray_example.py sample_data/roads/train roads-features/

`tlearn.scale.ray.BatchExtractor` is a callable class for `Dataset.map_batches`: Ray starts a
pool of actors, each loads the backbone once and turns batches of image paths into
feature vectors (the same backbone, cut, pooling and preprocessing as `tlearn extract`
with the same options). Every input row comes back with a `skipped` column: "" for a
readable image, else the reason; unreadable images get NaN features, so filter them out
as below. Ray splits the data into its own batches, so floats can differ from
`tlearn extract` in the last bit (CPU kernels choose their algorithm by batch size);
use `tlearn extract` under torchrun when you need byte-identical CSVs.
"""

from __future__ import annotations

import sys


def extract_with_ray(
    paths,
    *,
    model: str | None = None,
    weights: str = "auto",
    layers: str | None = None,
    pool: str = "avg",
    batch_size: int = 32,
    concurrency: int = 2,
    num_gpus: float = 0,
):
    """A Ray Dataset with columns path, features, skipped (one row per path)."""
    import ray

    from tlearn.scale.ray import BatchExtractor

    ds = ray.data.from_items([{"path": str(p)} for p in paths])
    return ds.map_batches(
        BatchExtractor,
        fn_constructor_kwargs={"model": model, "weights": weights, "layers": layers, "pool": pool},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,  # actors, each with its own copy of the backbone
        num_gpus=num_gpus,  # e.g. 1: one GPU per actor
    )


def main(argv: list[str]) -> None:
    from tlearn.data.scan import scan_inputs

    if len(argv) < 2:
        sys.exit("usage: python docs/ray_example.py IMAGES_OR_FOLDERS... OUTPUT_DIR")
    images = scan_inputs(argv[:-1])
    ds = extract_with_ray(images.paths)
    ds.filter(lambda row: row["skipped"] == "").write_parquet(argv[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
