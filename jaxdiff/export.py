"""`python -m jaxdiff.export --checkpoint OUT/checkpoints/STEP`: a checkpoint of either backend as a diffusers
pipeline (the run's backend restores it; `jaxdiff.publish` writes the folder)."""

import argparse
from pathlib import Path

import yaml

from jaxdiff.checkpoint import resolve_resume
from jaxdiff.cli import exit_with, validate
from jaxdiff.config import ConfigError
from jaxdiff.train import load_backend


def main(argv: list[str] | None = None) -> None:
    """`python -m jaxdiff.export --checkpoint OUT/checkpoints/STEP`: any checkpoint -> a diffusers pipeline."""
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.export", description=main.__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="A checkpoint step folder, or a run's output_dir for its latest."
    )
    parser.add_argument("--output_dir", help="Where the pipeline goes (default: the run's output_dir).")
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=None, help="Export the EMA weights (default: if kept)."
    )
    parser.add_argument("--export_dtype", choices=("fp32", "fp16", "bf16"), help="Default: the run's export_dtype.")
    args = parser.parse_args(argv)
    try:
        given = Path(args.checkpoint)
        if (given / "checkpoints").is_dir():
            given = given / "checkpoints"
        if given.name == "checkpoints":
            resume = resolve_resume("latest", given, flag="--checkpoint")
        else:
            resume = resolve_resume(str(given), given.parent, flag="--checkpoint")
        if resume is None:
            raise ConfigError(f"--checkpoint={args.checkpoint!r}: no finished checkpoint there")
        checkpoint = resume[0]
        run_dir = checkpoint.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--checkpoint={args.checkpoint!r}: no config.yaml in the run folder {run_dir}")
        config = validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        use_ema = config.use_ema if args.ema is None else args.ema
        if use_ema and not config.use_ema:
            raise ConfigError(f"--ema: the run at {run_dir} kept no EMA weights (use_ema was off)")
        output_dir = Path(args.output_dir or config.output_dir)
        dtype = args.export_dtype or config.export_dtype
        load_backend(config.backend).export_checkpoint(config, checkpoint, output_dir, use_ema=use_ema, dtype=dtype)
        print(f"exported {checkpoint} ({'EMA' if use_ema else 'raw'} weights) to {output_dir}")
    except ConfigError as err:
        exit_with(err)


if __name__ == "__main__":
    main()
