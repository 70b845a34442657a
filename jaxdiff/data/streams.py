"""What every training stream shares (random-access and WebDataset): its loader settings and its elements."""

import dataclasses

import numpy as np

from jaxdiff.data.errors import DataConfigError

#: One element of a stream: (epoch, example dict) or (epoch, reason the sample is skipped).
Element = tuple[int, dict[str, np.ndarray] | str]


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """Batching, order and parallelism. `global_batch_size` counts all hosts; each host yields its slice."""

    global_batch_size: int
    seed: int = 0
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0:
            raise DataConfigError(f"global_batch_size={self.global_batch_size} must be positive")
        if self.dataloader_num_workers < 0:
            raise DataConfigError(f"dataloader_num_workers={self.dataloader_num_workers} must be >= 0")
        if not 0 <= self.seed < 2**32:
            raise DataConfigError(f"seed={self.seed} must be in [0, 2**32)")
