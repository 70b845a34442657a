"""From command line and YAML to a validated, resolved ``TrainConfig``.

Precedence is defaults < YAML (``--config``) < flags. Every failure here is a ``ConfigError``: one message
naming the field, the value and what is allowed, turned into exit code 2 by the entry points.
"""

import argparse
import difflib
import re
import secrets
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from jaxdiff.config import (
    GROUPS,
    LCM_TASKS,
    ConfigError,
    TrainConfig,
    field_meta,
    unsupported_fields,
    with_task_defaults,
)
from jaxdiff.hub import HUB_ID, HubOptions, ModelFilesNotFoundError, pipeline_class

EXIT_CONFIG_ERROR = 2

# model_index.json `_class_name` -> task. LCM students are trained from a teacher, not from these.
PIPELINE_TASKS = {
    "StableDiffusionPipeline": "text_to_image",
    "StableDiffusionXLPipeline": "sdxl",
    "DDPMPipeline": "unconditional",
    "DDIMPipeline": "unconditional",
}
TEACHER_TASKS = {"StableDiffusionPipeline": "lcm", "StableDiffusionXLPipeline": "lcm_sdxl"}


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, TrainConfig.model_fields, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            flag = match.group(1).split("=")[0]
            message = f"unknown flag {flag}{_did_you_mean(flag.lstrip('-').replace('-', '_'))}"
        raise ConfigError(message)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(arg) is list for arg in (annotation, *typing.get_args(annotation)))


def _choices(annotation: Any) -> list[Any] | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(args)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    return list(typing.get_args(literals[0])) if literals else None


#: Other spellings of a field's flag that diffusers' scripts use.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "lora_rank": ("--rank",),
    "validation_prompts": ("--validation_prompt",),
    # diffusers' train_unconditional.py spellings.
    "num_train_epochs": ("--num_epochs",),
    "ema_decay": ("--ema_max_decay",),
    "validation_epochs": ("--save_images_epochs",),
    "num_validation_images": ("--eval_batch_size",),
    "validation_num_inference_steps": ("--ddpm_num_inference_steps",),
    "report_to": ("--logger",),
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per config field, grouped by theme, help from the field descriptions."""
    parser = _Parser(
        prog="python -m jaxdiff.train",
        usage="%(prog)s [--config FILE.yaml] [--print_config] [--name value ...]",
        description="Fine-tune SD 1.x/2.x and SDXL, distill LCMs, train unconditional UNets; export to diffusers.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of field: value pairs (flags override it).")
    parser.add_argument(
        "--print_config", action="store_true", help="Print the resolved config as YAML and exit without training."
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for name, field in TrainConfig.model_fields.items():
        group = groups[field_meta(name)["group"]]
        flags = [f"--{name}", *FLAG_ALIASES.get(name, ())]
        text = field.description or ""
        shown_default = "" if field.default is None else f" (default: {field.default})"
        if _is_bool(field.annotation):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, help=text + shown_default)
        elif _is_list(field.annotation):
            group.add_argument(*flags, nargs="+", metavar="TEXT", help=text + shown_default)
        else:
            choices = _choices(field.annotation)
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else name.upper()
            group.add_argument(*flags, metavar=metavar, help=text + shown_default)
    parser.formatter_class = argparse.HelpFormatter  # defaults are already in the help text
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value, got {type(data).__name__}")
    unknown = [key for key in data if key not in TrainConfig.model_fields]
    if unknown:
        raise ConfigError("; ".join(f"--config {path}: unknown key {key!r}{_did_you_mean(key)}" for key in unknown))
    return data


def _format_validation_error(err: ValidationError, values: dict[str, Any]) -> str:
    lines = []
    for item in err.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        msg = item["msg"].removeprefix("Value error, ")
        if name:
            lines.append(f"--{name}={values.get(name, item.get('input'))!r}: {msg}")
        else:
            lines.append(msg)
    return "invalid config: " + "; ".join(lines)


def validate(values: dict[str, Any]) -> TrainConfig:
    """Validate a mapping of field values, raising ConfigError with every problem in one message."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, values)) from None


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse flags (and the YAML they name) into a validated config; also return --print_config."""
    args = vars(build_parser().parse_args(argv))
    print_config = args.pop("print_config", False)
    values = _load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    return validate(values), print_config


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def _check_path(config: TrainConfig, name: str, *, hub_ok: bool) -> None:
    value = getattr(config, name)
    if value is None or _is_local(value):
        return
    if hub_ok and HUB_ID.match(value):
        return
    allowed = "an existing local folder or a hub id like org/name" if hub_ok else "an existing local path"
    raise ConfigError(f"--{name}={value!r}: no such file or folder; expected {allowed}")


def _pipeline_class(config: TrainConfig, field: str) -> str | None:
    """The `_class_name` of the model_index.json of the pipeline ``config.<field>`` names, local or on the Hub
    (fetched with the run's revision, cache and token); None when a local folder has none."""
    try:
        return pipeline_class(getattr(config, field), HubOptions.from_config(config))
    except ModelFilesNotFoundError as err:
        raise ConfigError(f"--{field}: {err}") from None


def infer_task(config: TrainConfig) -> str:
    """The task named by --task, else the one implied by the teacher or the model folder."""
    if config.task:
        return config.task
    if config.instance_data_dir:
        return "dreambooth"
    if config.pretrained_teacher_model:
        cls = _pipeline_class(config, "pretrained_teacher_model")
        if cls in TEACHER_TASKS:
            return TEACHER_TASKS[cls]
        raise ConfigError(
            f"--pretrained_teacher_model={config.pretrained_teacher_model!r}: cannot infer the task from its "
            f"model_index.json (pipeline {cls!r}); pass --task lcm, lcm_sdxl or lcm_lora"
        )
    if config.pretrained_model_name_or_path:
        cls = _pipeline_class(config, "pretrained_model_name_or_path")
        if cls in PIPELINE_TASKS:
            return PIPELINE_TASKS[cls]
        raise ConfigError(
            f"--pretrained_model_name_or_path={config.pretrained_model_name_or_path!r}: cannot infer the task "
            f"(no readable model_index.json with a known pipeline, found {cls!r}); pass --task"
        )
    if config.model_config_name_or_path:
        return "unconditional"
    raise ConfigError("no model given: pass --pretrained_model_name_or_path (or --pretrained_teacher_model for LCM)")


def _previous_seed(config: TrainConfig) -> int:
    """The seed of the run being resumed (its config.yaml), so its data order goes on; else a new draw (each
    process draws one; the JAX trainer then takes process 0's, see `parallel.shared_seed`)."""
    recorded = Path(config.output_dir) / "config.yaml"
    if config.resume_from_checkpoint and recorded.is_file():
        seed = (yaml.safe_load(recorded.read_text()) or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return secrets.randbelow(2**31)


def resolve(config: TrainConfig) -> TrainConfig:
    """Check paths, infer the task and refuse fields the task or backend would ignore."""
    models = (
        "pretrained_model_name_or_path",
        "pretrained_teacher_model",
        "pretrained_vae_model_name_or_path",
        "model_config_name_or_path",
    )
    for name in models:
        _check_path(config, name, hub_ok=True)
    if not (config.dataset_name or "").startswith("tfds:"):  # TFDS names resolve under --tfds_data_dir
        _check_path(config, "dataset_name", hub_ok=True)
    _check_path(config, "tfds_data_dir", hub_ok=False)
    _check_path(config, "train_data_dir", hub_ok=False)
    _check_path(config, "instance_data_dir", hub_ok=False)
    if config.task is None:
        config = config.model_copy(update={"task": infer_task(config)})
    if config.seed is None:
        config = config.model_copy(update={"seed": _previous_seed(config)})
    problems = unsupported_fields(config)
    if problems:
        raise ConfigError("; ".join(problems))
    config = with_task_defaults(config)
    if config.task in LCM_TASKS:
        config = _one_teacher(config)
    if config.task != "unconditional" and not (
        config.pretrained_model_name_or_path or config.pretrained_teacher_model
    ):
        raise ConfigError(f"task {config.task} needs --pretrained_model_name_or_path")
    if config.task == "dreambooth":
        missing = [f"--{n}" for n in ("instance_data_dir", "instance_prompt") if getattr(config, n) is None]
        if missing:
            raise ConfigError(f"task dreambooth needs {' and '.join(missing)}")
        if config.class_data_dir and Path(config.class_data_dir).exists() and not Path(config.class_data_dir).is_dir():
            raise ConfigError(f"--class_data_dir={config.class_data_dir!r} exists and is not a folder")
    elif not (config.dataset_name or config.train_data_dir or config.train_shards_path_or_url):
        raise ConfigError("no training data: pass --dataset_name, --train_data_dir or --train_shards_path_or_url")
    return config


def _one_teacher(config: TrainConfig) -> TrainConfig:
    """An LCM run distills one pipeline, named by --pretrained_teacher_model (diffusers' flag) or
    --pretrained_model_name_or_path: both fields then name it (every task reads the latter)."""
    teacher, model = config.pretrained_teacher_model, config.pretrained_model_name_or_path
    if teacher and model and teacher != model:
        raise ConfigError(
            f"--pretrained_teacher_model={teacher!r} and --pretrained_model_name_or_path={model!r}: task "
            f"{config.task} distills one pipeline (the student starts from the teacher's UNet); give one of them"
        )
    return config.model_copy(
        update={"pretrained_teacher_model": teacher or model, "pretrained_model_name_or_path": teacher or model}
    )


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, secrets excluded."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def exit_with(error: Exception, code: int = EXIT_CONFIG_ERROR) -> NoReturn:
    """Print one clear line for a user error and exit; never a traceback."""
    print(f"jaxdiff: error: {error}", file=sys.stderr)
    sys.exit(code)
