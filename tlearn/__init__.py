"""tlearn: transfer learning on image folders, from the terminal and from Python.

The public API is what `__all__` names; each name is loaded from its module the first
time it is used, so `import tlearn` stays torch-free (a warm run never imports torch).

    import tlearn
    res = tlearn.fit("roads", "roads-model", run=tlearn.RunOptions(batch_size=64))
    preds = tlearn.predict("roads-model", ["photo.jpg"]).predictions

Layout (one-way layers, bottom to top; see README "Development"): core < data | heads <
backbone | runtime | cache | report | modeldir < features < scale < jobs | train < cli.
"""

from __future__ import annotations

import importlib

from tlearn.core.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    # errors and plain data
    "TlearnError": "tlearn.core.errors",
    "UsageError": "tlearn.core.errors",
    "DataError": "tlearn.core.errors",
    "ModelError": "tlearn.core.errors",
    "ArtifactError": "tlearn.core.errors",
    "StrictModeError": "tlearn.core.errors",
    "CutSpec": "tlearn.core.spec",
    "RunOptions": "tlearn.core.options",
    # images
    "ImageSet": "tlearn.data.imageset",
    "load_image": "tlearn.data.image",
    # features
    "CutRequest": "tlearn.features.engine",
    "SavedCut": "tlearn.features.engine",
    "open_engine": "tlearn.features.engine",
    "read_features_csv": "tlearn.features.table",  # the name before Parquet and NPY
    "read_table": "tlearn.features.table",
    # jobs (extract and predict also split over --shard / torchrun)
    "extract": "tlearn.jobs.distributed",
    "predict": "tlearn.jobs.distributed",
    "fit": "tlearn.jobs.fit",
    "evaluate": "tlearn.jobs.evaluate",
    "sweep": "tlearn.jobs.sweep",
    "heatmaps": "tlearn.jobs.heatmap",
    "audit": "tlearn.jobs.audit",
    "export_model": "tlearn.jobs.export",
    "merge_parts": "tlearn.scale.merge",
    "Shard": "tlearn.scale.shard",
    "BatchExtractor": "tlearn.scale.ray",
    # models and training
    "load_model": "tlearn.modeldir",
    "LinearHead": "tlearn.heads.linear",
    "TrainOptions": "tlearn.train.options",
    "fit_nn": "tlearn.train.api",
    "resume_nn": "tlearn.train.api",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # load once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
