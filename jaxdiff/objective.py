"""The framework-free half of the text-to-image task, shared by the JAX and torch tasks.

Which models train and which stay frozen, the tokenizers, the latent shape, the timestep bias, and the
host-drawn randoms of `--random_source host`. Each backend's task sets the attributes below and adds its
models, on-device draws, loss and sampler.
"""

from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.config import TrainConfig
from jaxdiff.diffusion.training import host_draws, timestep_bias_weights


class TextToImageRoles:
    """Mixin: needs `config`, `unet`, `text_encoder`, `vae`, `vae_folder`, `tokenizer` and a `_common(...)` call at
    init."""

    config: TrainConfig
    unet: Any
    text_encoder: Any
    vae: Any
    vae_folder: Any
    tokenizer: Any

    def _common(self, num_train_timesteps: int, unet_in_channels: int, vae_block_out_channels: int) -> None:
        """Sets `num_train_timesteps`, `timestep_weights` (None: uniform) and `latent_shape` (C, h, w)."""
        cfg = self.config
        self.num_train_timesteps = num_train_timesteps
        self.timestep_weights = (
            None
            if cfg.timestep_bias_strategy == "none"
            else timestep_bias_weights(
                num_train_timesteps,
                cfg.timestep_bias_strategy,
                cfg.timestep_bias_multiplier,
                cfg.timestep_bias_begin,
                cfg.timestep_bias_end,
                cfg.timestep_bias_portion,
            )
        )
        latent_size = cfg.resolution // 2 ** (vae_block_out_channels - 1)
        self.latent_shape = (unet_in_channels, latent_size, latent_size)

    @property
    def trainable(self) -> dict[str, Any]:
        """Modules whose parameters are optimised (and exported)."""
        models = {"unet": self.unet}
        if self.config.train_text_encoder:
            models["text_encoder"] = self.text_encoder
        return models

    @property
    def frozen(self) -> dict[str, Any]:
        """Modules used but not trained."""
        models = {"vae": self.vae}
        if not self.config.train_text_encoder:
            models["text_encoder"] = self.text_encoder
        return models

    @property
    def copied_components(self) -> dict[str, Any]:
        """Pipeline folders the export copies from elsewhere than the base pipeline: a separate VAE's."""
        return {"vae": Path(self.vae_folder)} if self.config.pretrained_vae_model_name_or_path else {}

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return (self.tokenizer,)

    def draw_host(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The step's randoms drawn with NumPy from (seed, step) (`--random_source host`), identical in both
        backends: `noise`, `noise_in`, `timesteps`, `latent_eps`, as each task's on-device `draw`."""
        cfg = self.config
        return host_draws(
            cfg.seed,
            step,
            batch_size,
            self.latent_shape,
            self.num_train_timesteps,
            self.timestep_weights,
            cfg.noise_offset,
            cfg.input_perturbation,
        )
