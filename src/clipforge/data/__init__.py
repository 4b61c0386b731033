"""Training data: sources (synthetic, webdataset, csv, folder) -> deterministic, resumable batches.

    data = build_train_loader(DataConfig(source="synthetic"), tokenizer, image_size=64, seed=0)
    for step, batch in enumerate(data.batches(start_batch), start=start_batch):
        ...  # batch.images [n,3,64,64], batch.tokens [n,77], batch.skipped {"corrupt_image": 0, ...}

``data.captions = "templates"`` trains on a labelled set instead (FLYP): each caption is a template filled
with the sample's class name (`clipforge.data.labels`).

The synthetic dataset's zero-shot split: `synthetic_zeroshot_set`, with `synthetic.TEMPLATES`,
`synthetic.CLASSNAMES` and `synthetic.HELDOUT`. See docs/data.md for the formats, the config fields,
skip counting and the resume conditions.
"""

from clipforge.data import synthetic
from clipforge.data.config import SOURCES, DataConfig
from clipforge.data.pipeline import Batch, TrainData, build_train_loader
from clipforge.data.samples import SKIP_REASONS, RawSample
from clipforge.data.sources import build_source
from clipforge.data.synthetic import ZeroShotSet, synthetic_zeroshot_set

__all__ = [
    "SKIP_REASONS",
    "SOURCES",
    "Batch",
    "DataConfig",
    "RawSample",
    "TrainData",
    "ZeroShotSet",
    "build_source",
    "build_train_loader",
    "synthetic",
    "synthetic_zeroshot_set",
]
