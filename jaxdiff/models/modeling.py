"""The base of every jaxdiff model: typed configs that are diffusers/transformers ``config.json`` files, and
``from_config`` / ``from_pretrained`` / ``save_pretrained`` on folders the torch libraries read and write."""

import dataclasses
import importlib.metadata
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike
from typing_extensions import Self

from jaxdiff import hub, weights

ConfigFormat = Literal["diffusers", "transformers"]
M = TypeVar("M", bound=nnx.Module)

# Bookkeeping keys transformers writes beside the fields; save_pretrained derives them from the model class.
_TRANSFORMERS_METADATA_KEYS = frozenset(
    {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
)


def _to_tuples(value: Any) -> Any:
    """JSON lists (nested too, e.g. SDXL's ``reverse_transformer_layers_per_block``) -> hashable tuples."""
    return tuple(map(_to_tuples, value)) if isinstance(value, list) else value


def _to_lists(value: Any) -> Any:
    return list(map(_to_lists, value)) if isinstance(value, tuple) else value


def abstract_model(build: Callable[[nnx.Rngs], M]) -> M:
    """``nnx.eval_shape`` of ``build(rngs)``: shapes, dtypes and metadata, no memory, no compute.

    The RNG counter stays a concrete host scalar while tracing: flax 0.12.8 reads ``.sharding`` of a traced
    counter at every draw, and that error path walks the whole trace, which made building SDXL's UNet abstractly
    take a minute (quadratic in the number of parameters) instead of seconds.
    """

    def traced() -> M:
        rngs = nnx.Rngs(0)
        rngs.params.count.set_raw_value(np.zeros((), np.uint32))
        return build(rngs)

    return nnx.eval_shape(traced)


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """A model folder's weight files (``weights_name`` with ``variant``) and whether pickled ones may be read."""

    folder: str | os.PathLike
    weights_name: str
    variant: str | None = None
    allow_pickle: bool = False
    #: Tensors the files lack, by torch name (a layer the model adds to the pretrained one, e.g. LCM's cond_proj).
    extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def state_dict(self) -> Mapping[str, np.ndarray]:
        """The torch-named tensors, read lazily from safetensors (see `weights.read_state_dict`), and `extra`."""
        files = weights.read_state_dict(
            self.folder, self.weights_name, variant=self.variant, allow_pickle=self.allow_pickle
        )
        return weights.ExtendedStateDict(files, self.extra) if self.extra else files

    def load_into(self, model: nnx.Module, shardings: Any = None) -> None:
        """Fills ``model``'s parameters (abstract or not) in place, tensor by tensor.

        ``shardings`` (a tree like ``nnx.state(model, nnx.Param)`` of ``jax.sharding.Sharding``) places each
        parameter straight into its sharded device array: no device ever holds a whole unsharded copy.
        """
        if shardings is not None:
            params = nnx.state(model, nnx.Param)
            placed = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
            nnx.update(model, placed)
        weights.load_state_dict(model, self.state_dict())


def torch_default_init(params: nnx.State, key: jax.Array) -> nnx.State:
    """Values for a model's parameters (``params``: their shapes and dtypes) as torch initialises a new module:
    the kernel and bias of each linear and conv layer U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in = every kernel
    axis but the last), norm scales 1 and biases 0. Each parameter draws from its own fold of ``key``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)

    def split(path: tuple) -> tuple[tuple, str]:  # (the layer's path, the parameter's name)
        return tuple(path[:-2]), path[-2].key

    fan_in = {split(p)[0]: math.prod(leaf.shape[:-1]) for p, leaf in flat if split(p)[1] == "kernel"}
    values = []
    for index, (path, leaf) in enumerate(flat):
        layer, name = split(path)
        if name in ("kernel", "bias") and layer in fan_in:
            bound = 1.0 / math.sqrt(fan_in[layer])
            values.append(jax.random.uniform(jax.random.fold_in(key, index), leaf.shape, leaf.dtype, -bound, bound))
        elif name in ("scale", "bias"):
            values.append((jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype))
        else:
            raise ValueError(f"no torch default initialisation for parameter {jax.tree_util.keystr(path)}")
    return jax.tree_util.tree_unflatten(treedef, values)


@dataclasses.dataclass(frozen=True)
class RandomInit:
    """The weights of a model trained from scratch, in place of a weights file: `torch_default_init` from ``seed``,
    drawn on the devices by one compiled function that writes each parameter straight into its sharding."""

    seed: int

    def state_dict(self) -> Mapping[str, np.ndarray]:
        """No tensors come from files."""
        return {}

    def load_into(self, model: nnx.Module, shardings: Any = None) -> None:
        """Fills ``model``'s parameters (abstract or not) in place, placed by ``shardings`` (a tree like
        ``nnx.state(model, nnx.Param)``; None: the default device)."""
        shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), nnx.state(model, nnx.Param))
        init = jax.jit(lambda key: torch_default_init(shapes, key), out_shardings=shardings)
        nnx.update(model, init(jax.random.PRNGKey(self.seed)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of model configs: frozen dataclasses whose fields are the torch library's ``config.json`` keys,
    unchanged (misnomers included) and with the torch class's defaults. Sequences are stored as tuples."""

    model_type: ClassVar[str | None] = None  # transformers' ``model_type``; None for diffusers configs

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Self:
        """Builds the config from a ``config.json`` dict: drops ``_``-prefixed and transformers bookkeeping keys,
        ignores unknown keys with a warning naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in config.items() if k in names}
        unknown = sorted(
            k for k in config if k not in names and not k.startswith("_") and k not in _TRANSFORMERS_METADATA_KEYS
        )
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: _to_tuples(v) for k, v in known.items()})

    def to_dict(self) -> dict[str, Any]:
        """The config's fields as JSON-ready values (tuples become lists)."""
        return {k: _to_lists(v) for k, v in dataclasses.asdict(self).items()}

    def check_supported(self, key: str, *allowed: Any) -> None:
        """Raises ValueError naming the key and its value unless the value is one of ``allowed``.

        Models call this for every config value they do not implement in full, instead of silently ignoring it.
        """
        value = getattr(self, key)
        if value not in allowed:
            raise ValueError(
                f"{type(self).__name__}.{key}={value!r} is not supported by jaxdiff; supported: "
                + ", ".join(map(repr, allowed))
            )


def library_version(package: str, fallback: str) -> str:
    """The installed version of ``package``, else ``fallback``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return fallback


class PretrainedModel(nnx.Module):
    """Mixin for models loadable from, and savable to, diffusers/transformers folders.

    Every model is built as ``Model(config, *, dtype, param_dtype, attention_impl, gradient_checkpointing, rngs)``
    (``dtype`` computes, ``param_dtype`` stores) and keeps its config as ``self.config``.
    """

    config_class: ClassVar[type[ModelConfig]]
    torch_class_name: ClassVar[str]  # written as ``_class_name`` (diffusers) or ``architectures`` (transformers)
    config_format: ClassVar[ConfigFormat] = "diffusers"
    weights_name: ClassVar[str] = "diffusion_pytorch_model.safetensors"

    config: ModelConfig

    @classmethod
    def _config(cls, config: Mapping[str, Any] | ModelConfig) -> ModelConfig:
        return config if isinstance(config, cls.config_class) else cls.config_class.from_dict(config)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | ModelConfig, *, rngs: nnx.Rngs | None = None, **kwargs: Any
    ) -> Self:
        """A randomly initialised model (``rngs`` defaults to ``nnx.Rngs(0)``); kwargs go to the constructor."""
        return cls(cls._config(config), rngs=rngs or nnx.Rngs(0), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> Self:
        """Loads a diffusers/transformers folder (or Hub repo id) written by ``save_pretrained`` of either library.

        Takes the arguments of `abstract_from_pretrained`: the model is built abstractly and filled from the
        checkpoint, so no random initialisation happens first. Raises ``hub.ModelFilesNotFoundError`` when the
        folder, subfolder, config or weights are missing, and ``weights.WeightsMismatchError`` when they do not fit.
        """
        model, weights_file = cls.abstract_from_pretrained(path, subfolder, **kwargs)
        weights_file.load_into(model)
        return model

    @classmethod
    def abstract_from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        variant: str | None = None,
        allow_pickle: bool = False,
        config_updates: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[Self, "PretrainedWeights"]:
        """The model of a folder's ``config.json`` built abstractly (no memory), and where its weights are.

        ``dtype`` computes, ``param_dtype`` stores (parameters are cast to it on loading); ``variant`` picks e.g.
        ``*.fp16.safetensors``; pickled ``.bin`` weights are read only with ``allow_pickle``; other keyword
        arguments go to the constructor. ``config_updates`` change the folder's config (the weights must still fit,
        with `PretrainedWeights.extra` for what they lack).

        `PretrainedWeights.load_into` fills it later, e.g. once its parameters carry their shardings. Only configs
        are read: a folder of configs alone is enough (``benchmarks/tpu_compile.py`` compiles from one).
        """
        options = hub.HubOptions(variant=variant, allow_pickle=allow_pickle)
        folder = hub.resolve_model(path, subfolder, cls.weights_name, options)
        config = cls._config({**weights.read_config(folder), **(config_updates or {})})
        weights_file = PretrainedWeights(folder, cls.weights_name, variant, allow_pickle)

        def build(rngs: nnx.Rngs) -> Self:
            return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)

        model = abstract_model(build)
        if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))):
            # Non-parameter state (RNG streams, statistics) is not in checkpoints: compute only that part.
            nnx.update(model, jax.jit(lambda: nnx.state(build(nnx.Rngs(0)), nnx.Not(nnx.Param)))())
        return model, weights_file

    @classmethod
    def abstract_from_config(
        cls,
        config: Mapping[str, Any] | ModelConfig,
        *,
        seed: int,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        **kwargs: Any,
    ) -> tuple[Self, RandomInit]:
        """The model of ``config`` built abstractly (no memory), and its `RandomInit` from ``seed`` (a new model,
        as `abstract_from_pretrained` gives a pretrained one; other keyword arguments go to the constructor)."""
        model_config = cls._config(config)
        model = abstract_model(
            lambda rngs: cls(model_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)
        )
        return model, RandomInit(seed)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        max_shard_size: int | str = "10GB",
        dtype: DTypeLike | None = None,
        variant: str | None = None,
    ) -> None:
        """Writes ``config.json`` and safetensors the torch library loads with its own ``from_pretrained``.

        ``dtype`` casts floating-point tensors on the way out (e.g. ``jnp.float16`` with ``variant="fp16"``).
        """
        state_dict = weights.module_to_state_dict(self)
        if dtype is not None:
            state_dict = {
                k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in state_dict.items()
            }
        weights.write_state_dict(state_dict, path, self.weights_name, max_shard_size=max_shard_size, variant=variant)
        config = self.config.to_dict()
        if self.config_format == "diffusers":
            config = {
                "_class_name": self.torch_class_name,
                "_diffusers_version": library_version("diffusers", "0.35.0"),
                **config,
            }
        else:
            stored = next((v.dtype for v in state_dict.values() if jnp.issubdtype(v.dtype, jnp.floating)), np.float32)
            config |= {
                "architectures": [self.torch_class_name],
                "model_type": self.config_class.model_type,
                "dtype": np.dtype(stored).name,
                "transformers_version": library_version("transformers", "5.0.0"),
            }
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
