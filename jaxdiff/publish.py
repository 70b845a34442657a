"""The final diffusers pipeline at the root of ``output_dir``, and its upload to the Hugging Face Hub.

The export is the base pipeline with the trained components swapped in: every component folder named in the
base's ``model_index.json`` that was not trained is copied through (primary weights only: no fp16/EMA
variants, Flax or ONNX files, no pickled ``.bin`` beside safetensors); trained components are written with
their ``save_pretrained``. Each folder appears in one rename, and ``model_index.json`` is removed first and
written last, so an interrupted export never leaves a half-written component nor looks complete.
Nothing else in ``output_dir`` (``checkpoints/``, ``samples/``, logs, ``metrics.jsonl``, ``config.yaml``) is
touched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.config import ConfigError
from jaxdiff.files import honour_umask
from jaxdiff.hub import HubOptions, ModelFilesNotFoundError, hub_offline, resolve_pipeline, weight_names
from jaxdiff.models.modeling import library_version
from jaxdiff.weights import read_state_dict, write_state_dict

EXPORT_DTYPES: dict[str, Any] = {"fp32": np.float32, "fp16": np.float16, "bf16": jnp.bfloat16}
#: The torch dtype (attribute of ``torch``) of each export dtype, for components of the torch backend.
TORCH_EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MODEL_INDEX = "model_index.json"
#: Entries of output_dir that belong to training, never to the pipeline.
RESERVED = frozenset({"checkpoints", "samples", "logs", "metrics.jsonl", "config.yaml"})
#: What push_to_hub leaves out by default besides temporary files.
HUB_IGNORE = ("checkpoints", "logs")

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_PRIMARY_WEIGHTS = re.compile(rf"({'|'.join(_WEIGHT_STEMS)})(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)")
_PRIMARY_INDEX = re.compile(rf"({'|'.join(_WEIGHT_STEMS)})\.(safetensors|bin)\.index\.json")
_SKIPPED_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".ckpt", ".h5", ".pb", ".ot", ".pt", ".pth")
_COPIED_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_TMP_PREFIX = ".export-tmp-"
_OLD_PREFIX = ".export-old-"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler component of an export: diffusers' ``torch_class_name`` (e.g. ``LCMScheduler``) with ``config``,
    written as its ``scheduler_config.json``."""

    torch_class_name: str
    config: Mapping[str, Any]

    def save_pretrained(self, folder: Path, *, dtype: Any = None) -> None:
        """Writes ``folder/scheduler_config.json`` (``dtype``, for the export's other components, has no say)."""
        config = {"_class_name": self.torch_class_name, **self.config}
        (Path(folder) / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _export_dtype(dtype: str) -> Any:
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export_dtype={dtype!r} is not supported; allowed: {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[dtype]


def _resolve_base(
    base_model: str | os.PathLike, copied: Callable[[dict[str, Any]], list[str]], options: HubOptions
) -> Path:
    """The local pipeline folder: ``base_model`` itself, or the Hub snapshot of the files the export copies (the
    weights of its ``copied`` components, of ``options.variant`` when one is set)."""
    try:
        index = _read_model_index(resolve_pipeline(base_model, (), options))
        return resolve_pipeline(base_model, copied(index), options)
    except ModelFilesNotFoundError as err:
        raise ConfigError(f"cannot get the base pipeline to export next to the trained components: {err}") from None


def _read_model_index(folder: Path) -> dict[str, Any]:
    file = folder / MODEL_INDEX
    if not file.is_file():
        raise ConfigError(f"pretrained_model_name_or_path={os.fspath(folder)!r} has no {MODEL_INDEX}: not a pipeline")
    return json.loads(file.read_text())


def _pipeline_components(index: Mapping[str, Any]) -> list[str]:
    """Component folders of a model_index.json: entries ``[library, class]`` with a class (not ``None``)."""
    return [
        name
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None
    ]


def _pipeline_files(folder: Path) -> Iterable[str]:
    """The files of one component folder worth exporting (relative names; nested folders included)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    primary = [b for b in map(os.path.basename, names) if _PRIMARY_WEIGHTS.fullmatch(b) or _PRIMARY_INDEX.fullmatch(b)]
    has_safetensors = any(".safetensors" in b for b in primary)
    for name in names:
        base = os.path.basename(name)
        if base.startswith(".") or base.endswith(_SKIPPED_SUFFIXES):
            continue
        if base.startswith(_WEIGHT_STEMS) and not (_PRIMARY_WEIGHTS.fullmatch(base) or _PRIMARY_INDEX.fullmatch(base)):
            continue  # variants (fp16, non_ema, ...) and other formats
        if has_safetensors and (base.endswith(".bin") or base.endswith(".bin.index.json")):
            continue
        yield name


def _copy_component(src: Path, dst: Path, variant: str | None) -> None:
    """Copies a component folder; with a ``variant`` its weights are written under the primary names, as diffusers'
    ``save_pretrained`` does for a pipeline loaded with that variant."""
    weights_name = next(
        (n for n in _COPIED_WEIGHTS if variant and any((src / f).is_file() for f in weight_names(n, variant)[0])), None
    )
    for name in _pipeline_files(src):
        if weights_name and os.path.basename(name).startswith(_WEIGHT_STEMS):
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dst / name)
    if weights_name:
        write_state_dict(read_state_dict(src, weights_name, variant=variant), dst, weights_name)


def _write_folder(output_dir: Path, name: str, fill: Callable[[Path], None]) -> None:
    """Fills ``output_dir/name`` through a temporary folder and swaps it in, so it is whole or absent; its files
    get the umask's mode (torch's save_pretrained writes 0600 safetensors, copies would keep the base's modes)."""
    tmp, old = output_dir / f"{_TMP_PREFIX}{name}", output_dir / f"{_OLD_PREFIX}{name}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    honour_umask(tmp)
    final = output_dir / name
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _torch_module(component: Any) -> bool:
    """Whether ``component`` is a torch module; never imports torch (without it no torch module can exist)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(component, torch.nn.Module)


def _save_component(component: Any, folder: Path, dtype: str) -> None:
    """Writes a trained component as safetensors: a jaxdiff model in ``dtype``, or a torch diffusers/transformers
    model (from a copy cast to ``dtype`` when its weights have another dtype; the model itself is left as it is)."""
    if not _torch_module(component):
        component.save_pretrained(folder, dtype=_export_dtype(dtype))
        return
    torch = sys.modules["torch"]
    target = getattr(torch, TORCH_EXPORT_DTYPES[dtype])
    tensors = [*component.parameters(), *component.buffers()]
    if any(t.is_floating_point() and t.dtype != target for t in tensors):
        component = copy.deepcopy(component).to(target)
    component.save_pretrained(folder)


def _model_index_entry(component: Any) -> list[str] | None:
    """``[library, class]`` for a jaxdiff model (its torch class) or a torch model, ``None`` when the component
    does not say."""
    if _torch_module(component):
        return [type(component).__module__.split(".")[0], type(component).__name__]
    torch_class = getattr(component, "torch_class_name", None)
    if torch_class is None:
        return None
    library = "diffusers" if getattr(component, "config_format", "diffusers") == "diffusers" else "transformers"
    return [library, torch_class]


def export_pipeline(
    output_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None,
    components: Mapping[str, Any],
    extras: Mapping[str, Any] | None = None,
    dtype: str = "fp32",
    options: HubOptions | None = None,
    pipeline_class: str | None = None,
) -> Path:
    """Writes the diffusers pipeline ``base_model`` with ``components`` swapped in to the root of ``output_dir``;
    without a base (a model trained from scratch), the ``pipeline_class`` pipeline of ``components`` alone.

    ``components`` maps a pipeline folder name (``"unet"``, ``"text_encoder"``, ...) to a model with jaxdiff's
    ``save_pretrained(path, *, dtype=...)``, or to a torch diffusers ``ModelMixin`` / transformers
    ``PreTrainedModel`` (the torch backend's); its parameters must be addressable here (gathered, main process);
    or to a model folder (a ``Path``, e.g. a separate pretrained VAE), copied in place of the base's; or to a
    `SchedulerConfig`. ``extras`` are models written beside the pipeline's folders but not part of its
    ``model_index.json`` (LCM's target network ``unet_target/``, as diffusers' scripts save it).
    ``dtype`` (fp32, fp16, bf16) is the dtype of the trained components' floating-point weights; copied
    components keep theirs. A Hub id is fetched with ``options`` (revision, cache, token; `HubOptions.from_config`).
    Returns ``output_dir``.
    """
    _export_dtype(dtype)
    extras = extras or {}
    reserved = sorted(RESERVED.intersection({*components, *extras}))
    if reserved:
        raise ValueError(f"component names {reserved} clash with training files in output_dir")
    output_dir = Path(output_dir)

    options = options or HubOptions()
    folders = {name: Path(c) for name, c in components.items() if isinstance(c, os.PathLike)}
    components = {name: c for name, c in components.items() if name not in folders}

    def copied(index: dict[str, Any]) -> list[str]:
        return [name for name in _pipeline_components(index) if name not in components and name not in folders]

    if base_model is None:
        if pipeline_class is None:
            raise ValueError("an export without a base pipeline needs its pipeline_class")
        base, index = (
            None,
            {"_class_name": pipeline_class, "_diffusers_version": library_version("diffusers", "0.35.0")},
        )
    else:
        base = _resolve_base(base_model, copied, options)
        index = _read_model_index(base)
    unknown = [n for n, c in components.items() if n not in index and _model_index_entry(c) is None]
    unknown += [n for n in folders if n not in index]
    if unknown:
        raise ValueError(f"components {unknown} are not in the base {MODEL_INDEX} and do not name a torch class")
    output_dir.mkdir(parents=True, exist_ok=True)
    in_place = base is not None and base.resolve() == output_dir.resolve()
    if not in_place:  # back only once the export is whole
        (output_dir / MODEL_INDEX).unlink(missing_ok=True)
    for name in copied(index):
        if in_place or name in RESERVED:
            continue
        if not (base / name).is_dir():
            raise ConfigError(f"pretrained_model_name_or_path={os.fspath(base_model)!r} has no {name}/ folder")
        _write_folder(output_dir, name, lambda tmp, src=base / name: _copy_component(src, tmp, options.variant))
    for name, folder in folders.items():
        _write_folder(output_dir, name, lambda tmp, src=folder: _copy_component(src, tmp, None))
    for name, component in components.items():
        _write_folder(output_dir, name, lambda tmp, model=component: _save_component(model, tmp, dtype))
        index[name] = _model_index_entry(component) or index[name]
    for name, component in extras.items():
        _write_folder(output_dir, name, lambda tmp, model=component: _save_component(model, tmp, dtype))
    tmp = output_dir / f"{_TMP_PREFIX}{MODEL_INDEX}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, output_dir / MODEL_INDEX)
    return output_dir


def check_hub_access(push_to_hub: bool, hub_model_id: str | None, token: str | None = None) -> None:
    """Refuses a run that will push to the Hub but cannot reach it: at start, not after training.

    Checks offline mode, the token (``whoami``) and that the repository exists or can be created.
    """
    if not push_to_hub:
        return
    if not hub_model_id:
        raise ConfigError("push_to_hub needs hub_model_id (the Hub repository to upload to, e.g. user/my-model)")
    if hub_offline():
        raise ConfigError(
            f"push_to_hub=True (hub_model_id={hub_model_id!r}) needs network access to the Hugging Face Hub, but "
            "HF_HUB_OFFLINE is set: unset it, or drop push_to_hub and upload output_dir later"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as err:  # no token, bad token or no network
        raise ConfigError(
            f"push_to_hub=True (hub_model_id={hub_model_id!r}) needs network access to the Hugging Face Hub and a "
            f"token (`hf auth login` or hub_token): {err}"
        ) from err
    try:
        api.create_repo(hub_model_id, exist_ok=True)
    except Exception as err:
        raise ConfigError(
            f"hub_model_id={hub_model_id!r}: cannot create or write to this Hub repository: {err}"
        ) from err


def push_to_hub(
    output_dir: str | os.PathLike,
    hub_model_id: str,
    token: str | None = None,
    *,
    ignore: Iterable[str] = HUB_IGNORE,
    commit_message: str = "Upload pipeline trained with jaxdiff",
) -> str:
    """Uploads ``output_dir`` to the Hub model repo ``hub_model_id`` without the ``ignore`` folders; returns the
    commit URL. Temporary export folders are never uploaded."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(hub_model_id, exist_ok=True)
    patterns = [f"{name.strip('/')}/*" for name in ignore] + [f"{_TMP_PREFIX}*", f"{_OLD_PREFIX}*", "*.tmp"]
    commit = api.upload_folder(
        repo_id=hub_model_id,
        folder_path=os.fspath(output_dir),
        commit_message=commit_message,
        ignore_patterns=patterns,
    )
    return commit.commit_url
