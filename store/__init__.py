"""The feature store: one Zarr v3 group of per-layer (N, D_l) embeddings plus Parquet manifests."""

from store.errors import UserError
from store.features import FeatureArray, FeatureStore, StoreEntry, array_path
from store.io import write_json_atomic, write_text_atomic
from store.manifest import (
    PAIR_COLUMNS,
    fingerprint,
    image_table,
    pair_labels,
    pair_rows,
    read_manifest,
    write_manifest,
)

__all__ = [
    "PAIR_COLUMNS",
    "FeatureArray",
    "FeatureStore",
    "StoreEntry",
    "UserError",
    "array_path",
    "fingerprint",
    "image_table",
    "pair_labels",
    "pair_rows",
    "read_manifest",
    "write_json_atomic",
    "write_manifest",
    "write_text_atomic",
]
