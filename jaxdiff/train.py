"""`python -m jaxdiff.train [--config FILE.yaml] [--name value ...]`: parse, resolve, hand to the backend."""

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

from jaxdiff import cpu_devices
from jaxdiff.cli import exit_with, parse_args, resolve, to_yaml
from jaxdiff.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the command lines need of a backend: its tasks, a training run, and a checkpoint's export."""

    tasks: Mapping[str, object]
    train: Callable[[TrainConfig], None]
    export_checkpoint: Callable[..., None]


def load_backend(name: str) -> Backend:
    """The backend ``name``; torch is imported only for the torch backend."""
    if name == "jax":
        from jaxdiff import trainer
        from jaxdiff.tasks import TASKS

        return Backend(TASKS, trainer.train, trainer.export_checkpoint)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("--backend torch needs PyTorch: pip install -e '.[torch]'") from None
    from torch_backend import trainer
    from torch_backend.tasks import TASKS

    return Backend(TASKS, trainer.train, trainer.export_checkpoint)


def run(config: TrainConfig) -> None:
    """Train with the configured backend and task."""
    if config.backend == "jax":
        cpu_devices.split_host(config)  # before jax starts
    backend = load_backend(config.backend)
    if config.task not in backend.tasks:
        raise ConfigError(
            f"task {config.task} is not implemented yet in the {config.backend} backend (it has: "
            f"{', '.join(sorted(backend.tasks))}); nothing was trained"
        )
    from jaxdiff.data import DataConfigError, NoUsableDataError
    from jaxdiff.metrics import NonFiniteLossError
    from jaxdiff.weights import ModelFilesNotFoundError, WeightsMismatchError

    try:
        backend.train(config)
    except (DataConfigError, NoUsableDataError, ModelFilesNotFoundError, WeightsMismatchError) as err:
        raise ConfigError(str(err)) from None
    except NonFiniteLossError as err:
        exit_with(err, code=1)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every user error ends in one message and exit code 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    try:
        config, print_config = parse_args(argv)
        config = resolve(config)
        if print_config:
            print(to_yaml(config), end="")
            return
        run(config)
    except ConfigError as err:
        exit_with(err)


if __name__ == "__main__":
    main()
