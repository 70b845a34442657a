"""Where model files come from: a local folder, or the Hugging Face Hub, fetching only the files a task reads.

One resolver for every task and both backends. For a Hub id it asks ``snapshot_download`` for exactly: the
pipeline's ``model_index.json``; its weightless folders (tokenizers, scheduler, feature extractor); and, for each
model it loads, ``config.json`` with the weights that ``read_state_dict`` reads, for the chosen variant
(safetensors, single or sharded with an index; pickled ``.bin`` only with ``allow_pickle`` and only where no
safetensors exist). Never Flax ``.msgpack``, ONNX, other variants or unrelated folders. The revision is resolved
to a commit once, so all files of a run come from the same commit. A model that cannot be had (offline and not
cached, no such repository or revision, no access, a missing component or variant) is one
``ModelFilesNotFoundError`` naming it and why.

Imports neither jax nor torch: the CLI reads ``model_index.json`` before jax starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxdiff.config import TrainConfig

#: A Hugging Face Hub repository id, ``org/name``.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_INDEX = "model_index.json"
#: Pickled weights read (with ``allow_pickle``) where a folder has no safetensors of this name.
PICKLED_NAMES = {
    "model.safetensors": "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
}
#: model_index.json classes whose folders hold no weights: fetched whole with any pipeline.
_WEIGHTLESS_CLASS = re.compile(r"Tokenizer|Scheduler|FeatureExtractor|Processor")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelFilesNotFoundError(FileNotFoundError):
    """A model cannot be had: a folder lacks what was asked for, or the Hub cannot give it; names model and why."""


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """How models are fetched and which weight files are read.

    ``token=None`` lets huggingface_hub use ``HF_TOKEN`` or the stored login.
    """

    revision: str | None = None
    cache_dir: str | None = None
    token: str | None = None
    variant: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_config(cls, config: TrainConfig) -> HubOptions:
        """The options of a run: ``--revision``, ``--cache_dir``, ``--hub_token``, ``--variant``,
        ``--allow_pickled_weights``."""
        return cls(
            revision=config.revision,
            cache_dir=config.cache_dir,
            token=config.hub_token,
            variant=config.variant,
            allow_pickle=config.allow_pickled_weights,
        )

    def for_other_repo(self) -> HubOptions:
        """For a model from another repository than the pipeline (``--pretrained_vae_model_name_or_path``):
        ``--revision`` and ``--variant`` name the pipeline's files, so it is read at its main revision, primary
        weights."""
        return dataclasses.replace(self, revision=None, variant=None)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read by huggingface_hub at import, or set since)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------------------------------------------------------
# Weight file names, as diffusers and transformers write them.


def add_variant(name: str, variant: str | None) -> str:
    """Inserts the variant before the extension: ``model.safetensors.index.json`` -> ``...index.fp16.json``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_names(weights_name: str, variant: str | None) -> list[tuple[str, str]]:
    """(single file, shard index) names to look for, in order: safetensors, then the pickled ``.bin``."""
    names = [weights_name] + ([PICKLED_NAMES[weights_name]] if weights_name in PICKLED_NAMES else [])
    return [(add_variant(name, variant), add_variant(f"{name}.index.json", variant)) for name in names]


def _shard_files(folder: str, index_file: str) -> list[str]:
    with open(index_file) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ModelFilesNotFoundError(f"{index_file} names shards missing from {folder}: {', '.join(missing)}")
    return [os.path.join(folder, name) for name in files]


def find_weight_files(
    folder: str | os.PathLike, weights_name: str, *, variant: str | None = None, allow_pickle: bool = False
) -> list[str]:
    """The weight files of a model folder: ``weights_name`` with ``variant`` inserted, else its shards (listed by
    the ``.index.json``); pickled ``.bin`` files only with ``allow_pickle=True``."""
    folder = os.fspath(folder)
    looked_for: list[str] = []
    for single, index in weight_names(weights_name, variant):
        looked_for += [single, index]
        if os.path.isfile(os.path.join(folder, single)):
            files = [os.path.join(folder, single)]
        elif os.path.isfile(os.path.join(folder, index)):
            files = _shard_files(folder, os.path.join(folder, index))
        else:
            continue
        if files[0].endswith(".bin") and not allow_pickle:
            raise ModelFilesNotFoundError(
                f"no safetensors weights in {folder} (looked for {looked_for[0]}, {looked_for[1]}); it holds pickled "
                f"{os.path.basename(files[0])}, which runs code when loaded: pass allow_pickle=True to load it anyway"
            )
        return files
    raise ModelFilesNotFoundError(f"no weights in {folder} (looked for {', '.join(looked_for)})")


def _weight_patterns(prefix: str, weights_name: str, variant: str | None, *, pickled: bool) -> list[str]:
    """Hub file patterns of one model's weights: the single file, the index and ``-0000k-of-0000n`` shards."""
    single, index = weight_names(weights_name, variant)[1 if pickled else 0]
    stem, ext = single.rsplit(".", 1)
    return [f"{prefix}{single}", f"{prefix}{index}", f"{prefix}{stem}-?????-of-?????.{ext}"]


# ---------------------------------------------------------------------------------------------------------------
# Local folders and Hub snapshots.


def _local(path_or_id: str | os.PathLike) -> Path | None:
    """The local folder ``path_or_id`` names, None for a Hub id; raises when it is neither."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFilesNotFoundError(f"{os.fspath(path_or_id)!r} is not a model folder")
    if not HUB_ID.match(os.fspath(path_or_id)):
        raise ModelFilesNotFoundError(f"model folder {os.fspath(path_or_id)!r} does not exist")
    return None


def _subfolder(root: Path, subfolder: str | None) -> Path:
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        raise ModelFilesNotFoundError(f"{root} has no subfolder {subfolder!r} (subfolders there: {found or 'none'})")
    return folder


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class _Snapshot:
    """Files of one Hub repository, fetched into the Hub cache; the revision is pinned to the first commit seen."""

    def __init__(self, repo: str, options: HubOptions) -> None:
        self.repo, self.options = repo, options
        self.revision = options.revision
        rev = f" (revision {options.revision})" if options.revision else ""
        self.name = f"{repo!r}{rev}"

    def cache(self) -> str:
        from huggingface_hub import constants

        return self.options.cache_dir or constants.HF_HUB_CACHE

    def offline_hint(self) -> str:
        return (
            f"; HF_HUB_OFFLINE is set, so only the Hub cache at {self.cache()} was searched" if hub_offline() else ""
        )

    def fetch(self, patterns: Sequence[str], what: str) -> Path:
        """The snapshot folder, holding the repo's files that match ``patterns`` (``what`` names them)."""
        import huggingface_hub
        from huggingface_hub import errors

        try:
            folder = Path(
                huggingface_hub.snapshot_download(
                    self.repo,
                    revision=self.revision,
                    cache_dir=self.options.cache_dir,
                    token=self.options.token,
                    allow_patterns=list(patterns),
                )
            )
        except errors.GatedRepoError:
            why = "a gated repository: accept its terms on the Hub and log in (`hf auth login` or --hub_token)"
        except errors.RepositoryNotFoundError:
            why = (
                "no such repository on the Hub, or it is private and no valid token was given (`hf auth login`, "
                "HF_TOKEN or --hub_token)"
            )
        except errors.RevisionNotFoundError:
            why = f"the repository has no revision {self.revision!r}"
        except errors.IncompleteSnapshotError:
            why = f"the Hub cannot be reached and the Hub cache at {self.cache()} holds only part of the files"
        except errors.LocalEntryNotFoundError:
            reason = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
            why = f"{reason} and it is not in the Hub cache at {self.cache()}"
        except errors.HfHubHTTPError as err:
            why = f"the Hub refused ({_first_line(err)})"
        except (OSError, ValueError) as err:  # bad repo id (HFValidationError), network, file system
            why = _first_line(err)
        else:
            if _COMMIT.fullmatch(folder.name):  # pin the revision: every later fetch reads this commit
                self.revision = folder.name
            return folder
        raise ModelFilesNotFoundError(f"{self.name} could not be fetched from the Hugging Face Hub ({what}): {why}")

    def fetch_models(self, models: Mapping[str, str], extra: Sequence[str] = ()) -> Path:
        """Fetches ``extra`` patterns and, per model folder (``""`` for the root) -> weights name, its config.json
        and weights; checks they are all there."""
        opts = self.options
        prefixes = {folder: f"{folder}/" if folder else "" for folder in models}
        names = ", ".join(sorted(f or "the model" for f in models)) or "the pipeline files"
        variant = f" (variant {opts.variant})" if opts.variant else ""
        patterns = list(extra)
        for folder, weights_name in models.items():
            patterns.append(f"{prefixes[folder]}config.json")
            patterns += _weight_patterns(prefixes[folder], weights_name, opts.variant, pickled=False)
        root = self.fetch(patterns, f"{names}{variant}")
        if opts.allow_pickle:
            unsafe = {f: w for f, w in models.items() if w in PICKLED_NAMES and not self._has_weights(root, f, w)}
            pickled = [
                p for f, w in unsafe.items() for p in _weight_patterns(prefixes[f], w, opts.variant, pickled=True)
            ]
            if pickled:
                root = self.fetch(pickled, f"pickled weights of {', '.join(unsafe)}{variant}")
        for folder, weights_name in models.items():
            if not (root / prefixes[folder] / "config.json").is_file():
                raise ModelFilesNotFoundError(f"{self.name} has no {prefixes[folder]}config.json{self.offline_hint()}")
            try:
                find_weight_files(root / folder, weights_name, variant=opts.variant, allow_pickle=opts.allow_pickle)
            except ModelFilesNotFoundError as err:
                raise ModelFilesNotFoundError(f"{self.name}: {err}{self.offline_hint()}") from None
        return root

    def _has_weights(self, root: Path, folder: str, weights_name: str) -> bool:
        try:
            find_weight_files(root / folder, weights_name, variant=self.options.variant)
        except ModelFilesNotFoundError:
            return False
        return True


def _model_index(snapshot: _Snapshot, root: Path) -> dict[str, Any]:
    file = root / MODEL_INDEX
    if not file.is_file():
        raise ModelFilesNotFoundError(
            f"{snapshot.name} has no {MODEL_INDEX}: not a diffusers pipeline{snapshot.offline_hint()}"
        )
    return json.loads(file.read_text())


def resolve_pipeline(path_or_id: str | os.PathLike, components: Sequence[str], options: HubOptions) -> Path:
    """The local root of a diffusers pipeline: a local folder as it is, or the Hub snapshot holding
    model_index.json, its tokenizer, scheduler and feature-extractor folders and, for each model of
    ``components`` (e.g. ``("unet", "vae", "text_encoder")``), its config.json and weights (see the module doc)."""
    local = _local(path_or_id)
    if local is not None:
        return local
    snapshot = _Snapshot(os.fspath(path_or_id), options)
    index = _model_index(snapshot, snapshot.fetch([MODEL_INDEX], MODEL_INDEX))
    entries = {
        name: spec
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None
    }
    absent = [name for name in components if name not in entries]
    if absent:
        raise ModelFilesNotFoundError(
            f"{snapshot.name}: its {MODEL_INDEX} has no component {', '.join(absent)} (it has: {', '.join(entries)})"
        )
    weightless = [name for name, (_, cls) in entries.items() if _WEIGHTLESS_CLASS.search(cls)]
    models = {
        name: "diffusion_pytorch_model.safetensors" if entries[name][0] == "diffusers" else "model.safetensors"
        for name in components
        if name not in weightless
    }
    return snapshot.fetch_models(models, [MODEL_INDEX, *(f"{name}/*" for name in weightless)])


def pipeline_class(path_or_id: str | os.PathLike, options: HubOptions) -> str | None:
    """The ``_class_name`` of a pipeline's model_index.json (a local folder, or fetched from the Hub); None when a
    local folder has none."""
    index = resolve_pipeline(path_or_id, (), options) / MODEL_INDEX
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def resolve_model(
    path_or_id: str | os.PathLike, subfolder: str | None, weights_name: str, options: HubOptions
) -> Path:
    """The local folder of one model (``path_or_id[/subfolder]``): a local folder as it is, or the Hub snapshot
    of its config.json and weights (``weights_name`` for ``options.variant``, as ``resolve_pipeline`` fetches)."""
    local = _local(path_or_id)
    if local is None:
        local = _Snapshot(os.fspath(path_or_id), options).fetch_models({subfolder or "": weights_name})
    return _subfolder(local, subfolder)


def resolve_model_config(path_or_id: str | os.PathLike, weights_name: str, options: HubOptions) -> Path:
    """A model's config and, where they exist, its weights: a local config.json file or model folder as it is, or
    the Hub snapshot of a repo's config.json and ``weights_name`` (an architecture-only repo has no weights)."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return path
    local = _local(path_or_id)
    if local is not None:
        return local
    snapshot = _Snapshot(os.fspath(path_or_id), options)
    root = snapshot.fetch(
        ["config.json", *_weight_patterns("", weights_name, options.variant, pickled=False)], "config.json"
    )
    if not (root / "config.json").is_file():
        raise ModelFilesNotFoundError(f"{snapshot.name} has no config.json{snapshot.offline_hint()}")
    return root
