"""`python -m jaxdiff.train [--config FILE.yaml] [--name value ...]`: parse, resolve, hand to the backend."""

from collections.abc import Sequence

from jaxdiff.cli import ConfigError, exit_with, parse_args, resolve, to_yaml
from jaxdiff.config import TrainConfig

# (backend, task) pairs that train today. Each new task registers here with its runner.
IMPLEMENTED: dict[tuple[str, str], str] = {}


def _prepare_jax(config: TrainConfig) -> None:
    """Checks that need the devices: after joining the multi-host job, before any work."""
    from jaxdiff import parallel

    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh)
    parallel.global_batch_size(config.train_batch_size, config.global_batch_size, mesh)


def run(config: TrainConfig) -> None:
    """Train with the configured backend and task."""
    if config.backend == "jax":
        _prepare_jax(config)
    if (config.backend, config.task) not in IMPLEMENTED:
        raise ConfigError(
            f"task {config.task} is not implemented yet in the {config.backend} backend; nothing was trained"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every user error ends in one message and exit code 2."""
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
