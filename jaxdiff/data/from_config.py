"""The data specs of a training config: one place both backends build their input pipeline from."""

from jaxdiff.config import TrainConfig
from jaxdiff.data.dreambooth import DreamBoothSpec
from jaxdiff.data.sources import SourceSpec
from jaxdiff.data.streams import LoaderSpec
from jaxdiff.data.transforms import TransformSpec


def specs_from_config(
    config: TrainConfig, global_batch_size: int
) -> tuple[SourceSpec | DreamBoothSpec, TransformSpec, LoaderSpec]:
    """(source, transform, loader) specs of ``config``; ``global_batch_size`` counts all hosts and micro-batches."""
    source: SourceSpec | DreamBoothSpec = (
        DreamBoothSpec.from_config(config)
        if config.task == "dreambooth"
        else SourceSpec(
            dataset_name=config.dataset_name,
            dataset_config_name=config.dataset_config_name,
            cache_dir=config.cache_dir,
            train_data_dir=config.train_data_dir,
            train_shards_path_or_url=config.train_shards_path_or_url,
            tfds_data_dir=config.tfds_data_dir,
            image_column=config.image_column,
            caption_column=config.caption_column,
            max_train_samples=config.max_train_samples,
        )
    )
    transform = TransformSpec(
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        image_interpolation_mode=config.image_interpolation_mode,
        proportion_empty_prompts=config.proportion_empty_prompts,
    )
    loader = LoaderSpec(
        global_batch_size=global_batch_size, seed=config.seed, dataloader_num_workers=config.dataloader_num_workers
    )
    return source, transform, loader
