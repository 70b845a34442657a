"""diffusers/transformers weights <-> NNX modules: key conversion, and safetensors folders in and out.

Models copy the torch module paths, so a dotted NNX path is the torch state-dict key up to the leaf. The leaf
name and the tensor layout follow from the type of the module that owns the parameter (``nnx.Linear.kernel``
is torch's ``weight`` transposed, ``nnx.Conv.kernel`` is HWIO where torch is OIHW, ...). Nothing is guessed
from shapes: loading checks the key sets both ways and every shape, and reports all differences at once.
"""

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from jaxdiff.files import honour_umask
from jaxdiff.hub import ModelFilesNotFoundError, add_variant, find_weight_files

logger = logging.getLogger(__name__)

_Layout = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _kernel_to_torch(x: np.ndarray) -> np.ndarray:
    """(*spatial, in, out) -> (out, in, *spatial); for a Linear, (in, out) -> (out, in)."""
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def _kernel_from_torch(x: np.ndarray) -> np.ndarray:
    """(out, in, *spatial) -> (*spatial, in, out)."""
    return np.transpose(x, (*range(2, x.ndim), 1, 0))


def _linear_kernel_from_torch(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> (in, out); a 1x1-conv weight (out, in, 1, 1) counts as a Linear weight."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x[:, :, 0, 0]
    return _kernel_from_torch(x)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    torch_name: str
    to_torch: _Layout = _identity
    from_torch: _Layout = _identity


_KERNEL = _Leaf("weight", _kernel_to_torch, _kernel_from_torch)
_LEAVES: dict[tuple[type[nnx.Module], str], _Leaf] = {
    (nnx.Linear, "kernel"): _Leaf("weight", _kernel_to_torch, _linear_kernel_from_torch),
    (nnx.Conv, "kernel"): _KERNEL,
    (nnx.GroupNorm, "scale"): _Leaf("weight"),
    (nnx.LayerNorm, "scale"): _Leaf("weight"),
    (nnx.Embed, "embedding"): _Leaf("weight"),
}

# Older diffusers VAE checkpoints name their attention projections as the deprecated `AttnBlock` did; their
# 1x1-conv shaped weights load into Linears (see above).
_DEPRECATED_ATTENTION_RENAMES = (
    (r"(.*\.)?query\.(weight|bias)", r"\1to_q.\2"),
    (r"(.*\.)?key\.(weight|bias)", r"\1to_k.\2"),
    (r"(.*\.)?value\.(weight|bias)", r"\1to_v.\2"),
    (r"(.*\.)?proj_attn\.(weight|bias)", r"\1to_out.0.\2"),
)


class WeightsMismatchError(ValueError):
    """A state dict does not fit a module: lists every missing key, unexpected key and shape mismatch."""


def _torch_params(module: nnx.Module) -> Iterator[tuple[str, nnx.Param, _Leaf]]:
    """Yields (torch key, param, leaf rule) for every ``nnx.Param`` in the module tree."""
    nodes = dict(nnx.iter_graph(module))
    for path, node in nodes.items():
        if not isinstance(node, nnx.Param):
            continue
        owner = nodes[path[:-1]]
        rules = (rule for (cls, name), rule in _LEAVES.items() if name == path[-1] and isinstance(owner, cls))
        leaf = next(rules, _Leaf(str(path[-1])))
        yield ".".join(map(str, (*path[:-1], leaf.torch_name))), node, leaf


def _key_rules(module: nnx.Module, attribute: str) -> list[tuple[re.Pattern[str], str]]:
    """The (regex, replacement) rules module classes declare in ``attribute``, for the whole tree.

    A rule is anchored at the path of the module declaring it and applies only to keys below that module.
    """
    rules = []
    for path, sub in nnx.iter_modules(module):
        prefix = "".join(f"{part}." for part in path)
        for rule in getattr(type(sub), attribute, ()):
            pattern, replacement = (rule, "") if isinstance(rule, str) else rule
            rules.append((re.compile(re.escape(prefix) + f"(?:{pattern})"), prefix + replacement))
    return rules


def module_to_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters under torch key names and in torch layouts (host numpy arrays)."""
    return {
        key: leaf.to_torch(np.asarray(jax.device_get(param.get_value()))) for key, param, leaf in _torch_params(module)
    }


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
    """Fills the module's parameters in place from a torch-named state dict, keeping each parameter's dtype.

    Works on abstract modules (from ``nnx.eval_shape``) as well; an abstract parameter carrying a ``sharding`` is
    placed shard by shard. Tensors are read and converted one at a time. Raises ``WeightsMismatchError`` listing every
    missing key, unexpected key and shape mismatch. A key the module does not have is renamed by the first rule
    of ``_DEPRECATED_ATTENTION_RENAMES`` or of a module's ``_torch_key_renames`` (``(regex, replacement)`` pairs)
    that gives a key it has, else skipped if it matches a module's ``_ignored_torch_keys`` (regexes), else reported.
    """
    params = {key: (param, leaf) for key, param, leaf in _torch_params(module)}
    ignored = [pattern for pattern, _ in _key_rules(module, "_ignored_torch_keys")]
    renames = [(re.compile(p), r) for p, r in _DEPRECATED_ATTENTION_RENAMES] + _key_rules(module, "_torch_key_renames")
    incoming: dict[str, str] = {}  # model key -> checkpoint key
    unexpected = []
    for key in state_dict:
        source_key = key
        if key not in params:
            candidates = (pattern.sub(repl, key, count=1) for pattern, repl in renames if pattern.match(key))
            renamed = next((new for new in candidates if new in params and new not in state_dict), None)
            if renamed is not None:
                key = renamed
            elif any(p.fullmatch(key) for p in ignored):
                continue
            else:
                unexpected.append(key)
                continue
        incoming[key] = source_key

    missing = sorted(params.keys() - incoming.keys())
    mismatched = []
    for key, source_key in incoming.items():
        param, leaf = params[key]
        shape = _shape(state_dict, source_key)
        # Layouts checked on zero-stride stand-ins: no tensor is read, and ``current`` may be abstract.
        current = param.get_value()
        if leaf.from_torch(np.broadcast_to(np.int8(0), shape)).shape != current.shape:
            torch_shape = leaf.to_torch(np.broadcast_to(np.int8(0), current.shape)).shape
            mismatched.append(f"{key}: checkpoint {shape}, model {tuple(torch_shape)}")
    if missing or unexpected or mismatched:
        lines = [f"state dict does not match {type(module).__name__}:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", sorted(unexpected)),
            ("shape mismatches", mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {k}" for k in keys]
        raise WeightsMismatchError("\n".join(lines))

    for key, source_key in incoming.items():
        param, leaf = params[key]
        current = param.get_value()
        value = leaf.from_torch(np.asarray(state_dict[source_key])).astype(current.dtype)
        # With a sharding (abstract parameters carry theirs), each device receives only its shard.
        sharding = getattr(current, "sharding", None)
        param.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))


# ---------------------------------------------------------------------------------------------------------------
# Model folders: config.json + safetensors (single or sharded with an index), named as diffusers/transformers do.


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict."""
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        raise ModelFilesNotFoundError(f"no config.json in {os.fspath(folder)}")
    with open(file) as f:
        return json.load(f)


def _torch_load(file: str) -> dict[str, np.ndarray]:
    import torch  # only for opted-in pickled checkpoints

    tensors = torch.load(file, map_location="cpu", weights_only=True)
    # numpy has no bfloat16 of its own: reinterpret the bits as ml_dtypes' bfloat16 (jnp.bfloat16).
    return {
        k: t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        for k, t in tensors.items()
    }


class SafetensorsStateDict(Mapping[str, np.ndarray]):
    """The tensors of safetensors files as a read-only mapping that reads each tensor when it is looked up.

    ``shape(key)`` comes from the file headers, so checking a checkpoint against a model reads no tensor data,
    and loading holds one tensor at a time on the host.
    """

    def __init__(self, files: list[str]) -> None:
        self._handles = [safetensors.safe_open(file, framework="numpy") for file in files]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}  # noqa: SIM118

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header."""
        return tuple(self._where[key].get_slice(key).get_shape())


class ExtendedStateDict(Mapping[str, np.ndarray]):
    """A state dict with further tensors (e.g. a new layer's initial weights), the base one still read lazily."""

    def __init__(self, base: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray]) -> None:
        self._base, self._extra = base, extra

    def __getitem__(self, key: str) -> np.ndarray:
        return self._extra[key] if key in self._extra else self._base[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._extra
        yield from (key for key in self._base if key not in self._extra)

    def __len__(self) -> int:
        return len(self._extra) + sum(key not in self._extra for key in self._base)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._extra[key])) if key in self._extra else _shape(self._base, key)


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    lazy = isinstance(state_dict, SafetensorsStateDict | ExtendedStateDict)
    return state_dict.shape(key) if lazy else tuple(np.shape(state_dict[key]))


def read_state_dict(
    folder: str | os.PathLike, weights_name: str, *, variant: str | None = None, allow_pickle: bool = False
) -> Mapping[str, np.ndarray]:
    """The weights in a folder as a torch-named state dict of numpy arrays.

    Looks for ``weights_name`` (with ``variant`` inserted), then its sharded ``.index.json``; safetensors are read
    lazily (`SafetensorsStateDict`). Pickled ``.bin`` files are read only with ``allow_pickle=True``
    (``torch.load(weights_only=True)``).
    """
    files = find_weight_files(folder, weights_name, variant=variant, allow_pickle=allow_pickle)
    if not files[0].endswith(".bin"):
        return SafetensorsStateDict(files)
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(_torch_load(file))
    return state_dict


def write_state_dict(
    state_dict: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    weights_name: str,
    *,
    max_shard_size: int | str = "10GB",
    variant: str | None = None,
) -> None:
    """Writes safetensors as diffusers/transformers do: one file, or shards past ``max_shard_size`` plus an index.

    Weight files of the same name and variant left by an earlier save are removed, so the folder is unambiguous.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    name = add_variant(weights_name, variant)
    index_name = add_variant(f"{weights_name}.index.json", variant)
    stem = name.removesuffix(".safetensors")
    split = split_state_dict_into_shards_factory(
        dict(state_dict),
        get_storage_size=lambda a: a.nbytes,
        filename_pattern=stem + "{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    ours = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors|{re.escape(index_name)}")
    for old in os.listdir(folder):
        if ours.fullmatch(old) and old not in split.filename_to_tensors:
            os.remove(os.path.join(folder, old))
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: np.ascontiguousarray(state_dict[k]) for k in keys}
        path = os.path.join(folder, filename)
        safetensors.numpy.save_file(shard, path, metadata={"format": "pt"})
        honour_umask(path)  # safetensors creates its files with mode 0600
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(os.path.join(folder, index_name), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
