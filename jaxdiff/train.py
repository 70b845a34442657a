"""`python -m jaxdiff.train [--config FILE.yaml] [--name value ...]`: parse, resolve, hand to the backend."""

import logging
from collections.abc import Sequence

from jaxdiff.cli import ConfigError, exit_with, parse_args, resolve, to_yaml
from jaxdiff.config import TrainConfig

# (backend, task) pairs that train today.
IMPLEMENTED = {("jax", "text_to_image")}


def run(config: TrainConfig) -> None:
    """Train with the configured backend and task."""
    if (config.backend, config.task) not in IMPLEMENTED:
        raise ConfigError(
            f"task {config.task} is not implemented yet in the {config.backend} backend; nothing was trained"
        )
    from jaxdiff import trainer
    from jaxdiff.data import DataConfigError, NoUsableDataError
    from jaxdiff.weights import ModelFilesNotFoundError, WeightsMismatchError

    try:
        trainer.train(config)
    except (DataConfigError, NoUsableDataError, ModelFilesNotFoundError, WeightsMismatchError) as err:
        raise ConfigError(str(err)) from None
    except trainer.NonFiniteLossError as err:
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
