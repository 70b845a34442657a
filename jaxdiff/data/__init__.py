"""The training input pipeline shared by every task and both backends: sources, transforms, tokenization,
latent cache, per-host sharding and resumable order. Batches are dicts of numpy arrays (NCHW images)."""

from jaxdiff.data.errors import DataConfigError, NoUsableDataError
from jaxdiff.data.fingerprint import fingerprint_files
from jaxdiff.data.from_config import specs_from_config
from jaxdiff.data.latent_cache import LatentCache, build_latent_cache
from jaxdiff.data.pipeline import DataIterator, make_train_iterator
from jaxdiff.data.sources import SourceSpec, open_source
from jaxdiff.data.streams import LoaderSpec
from jaxdiff.data.transforms import INTERPOLATION_MODES, TransformSpec

__all__ = [
    "INTERPOLATION_MODES",
    "DataConfigError",
    "DataIterator",
    "LatentCache",
    "LoaderSpec",
    "NoUsableDataError",
    "SourceSpec",
    "TransformSpec",
    "build_latent_cache",
    "fingerprint_files",
    "make_train_iterator",
    "open_source",
    "specs_from_config",
]
