"""Several processes for real: 2 processes x 4 CPU devices, joined by jax.distributed on 127.0.0.1 (gloo
collectives), train exactly like 1 process x 8 devices, each reading only its share of the data; process 0 alone
writes config.yaml, metrics, samples and the export; the 2-process run resumes from its checkpoint. Also: the
launch flags' checks and tpu_scripts/launch.sh's shared-output_dir check (with a stand-in gcloud).

Every run is `python tests/test_multihost.py FLAGS` (the `__main__` block: `python -m jaxdiff.train` with a probe
that records which process calls the trainer's writers and which samples each process reads), with a timeout;
on a failure or a hang every process of the test is killed and the logs' tails are shown.
"""

import collections
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxdiff import cpu_devices
from jaxdiff.cli import parse_args, to_yaml
from jaxdiff.config import ConfigError, TrainConfig, unsupported_fields

PROBE_ENV = "JAXDIFF_TEST_PROBE"  # folder the probe writes its events to, one file per OS process
TIMEOUT_S = 600  # per batch of runs started together (about 2 min alone; a busy 2-core CI machine is slower)
REPO = Path(__file__).resolve().parents[1]
#: The trainer's writers the probe wraps (each must be called by process 0 only, once).
WRITERS = ("save_config", "save_validation_images", "export_pipeline")

FLAGS = [
    "--resolution", "32",
    "--center_crop",
    "--train_batch_size", "1",  # per device: a global batch of 8 on both layouts
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    # A large epsilon keeps Adam's update proportional to the gradient, so weights differ by reduction noise only.
    "--adam_epsilon", "1e-3",
    # The default --random_source device: draws are made for global positions, so each sample meets the same
    # noise and timestep on any layout.
    "--report_to", "none",
    "--logging_steps", "1",
    "--checkpointing_steps", "2",
    "--max_train_steps", "4",
]  # fmt: skip


class Run:
    """The processes of one training run (started together), with their logs."""

    def __init__(self, tmp_path: Path, name: str, flags: list[str], processes: int) -> None:
        self.name, self.started = name, time.monotonic()
        self.probe = tmp_path / "probe" / name
        self.probe.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k != cpu_devices.SPLIT_ENV}
        user_flags = re.sub(rf"{cpu_devices.DEVICE_COUNT_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
        env.update(
            XLA_FLAGS=f"{user_flags} {cpu_devices.DEVICE_COUNT_FLAG}={8 // processes}".strip(),
            JAX_PLATFORMS="cpu",
            # The tests' persistent compilation cache (tests/conftest.py), so repeated runs do not recompile.
            JAX_COMPILATION_CACHE_DIR=_cache_dir(),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
            **{PROBE_ENV: str(self.probe)},
        )
        port = _free_port()
        self.logs = [tmp_path / f"{name}.{i}.log" for i in range(processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            launch = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes)]
            launch += ["--process_id", str(i)]
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, *flags, *(launch if processes > 1 else [])],
                        env=env,
                        cwd=REPO,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def tails(self) -> str:
        return "\n".join(f"--- {log.name} (exit {p.returncode}):\n{log.read_text()[-3000:]}" for log, p in
                         zip(self.logs, self.procs, strict=True))  # fmt: skip

    def events(self) -> list[dict]:
        return [json.loads(line) for file in self.probe.iterdir() for line in file.read_text().splitlines()]


def _cache_dir() -> str:
    import jax

    return str(jax.config.jax_compilation_cache_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(*runs: Run) -> None:
    """Waits for every process of ``runs``; on a failure or the timeout kills them all and fails with the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    procs = [p for run in runs for p in run.procs]
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for run in runs:
        print(f"{run.name}: {len(run.procs)} process(es), {time.monotonic() - run.started:.1f} s")
    for run in runs:
        if any(p.returncode != 0 for p in run.procs):
            pytest.fail(f"run {run.name} failed or timed out after {TIMEOUT_S} s:\n{run.tails()}")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def writer_calls(run: Run) -> collections.Counter:
    return collections.Counter((e["process"], e["call"]) for e in run.events() if "call" in e)


def test_two_processes_train_like_one_and_resume(tmp_path, tiny_sd_path, shapes_dataset):
    data = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    validation = ["--validation_prompts", "a red circle", "--num_validation_images", "2"]
    # 24 samples, 8 a step: epoch 1 ends with step 3 (process 0's count decides it for both), then the final weights.
    validation += ["--validation_num_inference_steps", "2", "--validation_epochs", "1"]

    # No --seed: each process draws one, and process 0's must be the run's.
    first = Run(tmp_path, "2x4", [*FLAGS, *data, "--output_dir", str(two), *validation], processes=2)
    finish(first)
    config = yaml.safe_load((two / "config.yaml").read_text())
    seed = str(config["seed"])
    assert not {"coordinator_address", "num_processes", "process_id"} & set(config)  # launch details, not the run
    # One run at a time: on a busy 2-core machine a process that lags the other by over 30 s at a new collective
    # fails gloo's connection timeout.
    finish(Run(tmp_path, "1x8", [*FLAGS, *data, "--output_dir", str(one), "--seed", seed], processes=1))
    # The 2-process run continued from its step-2 checkpoint (same seed: it orders the data) in a fresh folder.
    resume = ["--seed", seed, "--resume_from_checkpoint", str(two / "checkpoints" / "2")]
    again = Run(tmp_path, "2x4-resumed", [*FLAGS, *data, "--output_dir", str(resumed), *resume], processes=2)
    finish(again)

    # The same training as one process: the 2-process global batch holds the same samples with the same draws, only
    # in another row order (host-major) and summed across processes by gloo, so losses and weights differ by float32
    # reduction order alone (observed: losses 1e-7 relative, weights <= 3e-8, one or two ulps). atol 1e-6 is far
    # below what a step on other data would change (the smallest per-tensor change in these 4 steps is ~2e-5).
    rows = metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once: one process writes metrics.jsonl
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in metrics(one)], rtol=1e-5)
    a, b = unet(two), unet(one)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    base = unet(tiny_sd_path)
    assert min(np.abs(a[k] - base[k]).max() for k in a) > 1e-6  # every tensor trained, well beyond the tolerance

    # Resumed from the 2-process checkpoint: exactly the uninterrupted run.
    assert [r["step"] for r in metrics(resumed)] == [3, 4]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in rows[2:]]
    c = unet(resumed)
    assert all(np.array_equal(a[k], c[k]) for k in a)

    # Process 0 alone writes: config.yaml and the export once, the samples at the epoch end and the end.
    assert writer_calls(first) == {(0, "save_config"): 1, (0, "save_validation_images"): 2, (0, "export_pipeline"): 1}
    assert writer_calls(again) == {(0, "save_config"): 1, (0, "export_pipeline"): 1}
    samples = sorted(p.name for p in (two / "samples").iterdir())
    assert samples == ["step-0000003_00_a-red-circle.png", "step-0000004_00_a-red-circle.png"]
    assert (two / "model_index.json").is_file()

    # Each host reads only its share: the 24 samples of epoch 0 (all consumed by the 4 x 8 samples) split into two
    # disjoint halves. Hosts ordering the data with different seeds would overlap.
    reads = collections.defaultdict(set)
    for e in first.events():
        if "read" in e and e["read"][0] == 0:
            reads[e["process"]].add(e["read"][1])
    assert len(reads[0]) == len(reads[1]) == 12
    assert reads[0].isdisjoint(reads[1]) and reads[0] | reads[1] == set(range(24))
    # ... and keeps its own position in the checkpoint.
    assert sorted(p.name for p in (two / "checkpoints" / "2" / "data_state").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_two_processes_generate_class_images_and_train_dreambooth(tmp_path, tiny_sd_path, dreambooth_folders):
    """DreamBooth's class images are sampled over the whole 2-process mesh (each process writes the same files into
    the shared folder, whole), and training on them goes as on one process."""
    instance, _ = dreambooth_folders
    class_dir = tmp_path / "class"
    data = [
        "--pretrained_model_name_or_path", str(tiny_sd_path),
        "--instance_data_dir", str(instance), "--instance_prompt", "a red circle",
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a circle",
        "--num_class_images", "3", "--sample_batch_size", "2", "--validation_num_inference_steps", "2",
        "--seed", "0",
    ]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    finish(Run(tmp_path, "2x4", [*FLAGS, *data, "--output_dir", str(two)], processes=2))
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    # The class images are all there now: the 1-process run trains on the same ones.
    finish(Run(tmp_path, "1x8", [*FLAGS, *data, "--output_dir", str(one)], processes=1))
    rows = metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "instance_loss", "prior_loss"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in metrics(one)], rtol=1e-5, err_msg=key)


# ---- the launch flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--coordinator_address", "10.0.0.2:1234"], "go together (all three"),
        (["--num_processes", "2", "--process_id", "1"], "missing --coordinator_address"),
        (
            ["--coordinator_address", "a:1", "--num_processes", "2", "--process_id", "2"],
            "must be in [0, num_processes",
        ),
        (["--coordinator_address", "10.0.0.2", "--num_processes", "2", "--process_id", "0"], "must be HOST:PORT"),
        (["--coordinator_address", "h:70000", "--num_processes", "2", "--process_id", "0"], "port in 1..65535"),
        (["--coordinator_address", "h:1", "--num_processes", "0", "--process_id", "0"], "--num_processes='0'"),
    ],
)
def test_launch_flags_are_checked_together(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)


def test_launch_flags_start_a_multi_process_run_on_the_jax_backend_only(monkeypatch):
    for name in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    config, _ = parse_args(["--coordinator_address", "[::1]:1234", "--num_processes", "2", "--process_id", "1"])
    assert cpu_devices.launched_multi_process(config)
    assert not cpu_devices.launched_multi_process(TrainConfig())
    assert "coordinator_address" not in to_yaml(config)
    torch, _ = parse_args(["--backend", "torch", "--coordinator_address", "h:1", "--num_processes", "2",
                           "--process_id", "0"])  # fmt: skip
    assert unsupported_fields(torch) == [
        f"--{name} is not supported by the torch backend (only jax)"
        for name in ("coordinator_address", "num_processes", "process_id")
    ]


# ---- tpu_scripts/launch.sh -------------------------------------------------------------------------------------

FAKE_GCLOUD = """#!/usr/bin/env python3
# Stand-in for `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=W --command CMD`: each worker is a HOME
# folder; the final training command (nohup ...) is recorded, not run.
import os, subprocess, sys
args = sys.argv[1:]
worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
command = args[args.index("--command") + 1]
homes = os.environ["FAKE_WORKERS"].split(os.pathsep)
code = 0
for i, home in enumerate(homes if worker == "all" else [homes[int(worker)]]):
    if "nohup" in command:
        with open(os.environ["FAKE_LAUNCHED"], "a") as f:
            f.write(home + "\\n")
        continue
    code |= subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": home}).returncode
sys.exit(code)
"""


@pytest.fixture
def fake_tpu(tmp_path):
    """Two fake TPU workers (HOME folders) reachable through a stand-in gcloud; returns a launch.sh runner."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    homes = []
    for i in range(2):
        home = tmp_path / f"worker{i}"
        (home / "jaxdiff").mkdir(parents=True)
        (home / "jaxdiff-venv" / "bin").mkdir(parents=True)
        (home / "jaxdiff-venv" / "bin" / "activate").write_text("")  # this interpreter's PATH stands in for it
        homes.append(str(home))
    launched = tmp_path / "launched.txt"
    env = dict(os.environ, FAKE_WORKERS=os.pathsep.join(homes), FAKE_LAUNCHED=str(launched))
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])

    def launch(*flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        result = subprocess.run(
            ["bash", str(REPO / "tpu_scripts" / "launch.sh"), "tpu", "zone", "--", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result, launched.read_text().split() if launched.exists() else []

    return launch


def test_launch_sh_needs_an_output_dir_every_worker_shares(fake_tpu, tmp_path, tiny_sd_path, shapes_dataset):
    data = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(shapes_dataset)]

    result, launched = fake_tpu(*data, "--output_dir", "run")  # relative: ~/jaxdiff/run, local to each worker
    assert result.returncode == 2 and not launched
    assert "is not shared by every worker" in result.stderr

    result, launched = fake_tpu(*data, "--output_dir", "gs://bucket/run")
    assert result.returncode == 2 and not launched
    assert "mount the bucket" in result.stderr

    result, launched = fake_tpu(*data, "--resolution", "-1")
    assert result.returncode == 2 and not launched
    assert "--resolution" in result.stderr

    shared = tmp_path / "shared" / "run"
    result, launched = fake_tpu(*data, "--output_dir", str(shared))
    assert result.returncode == 0, result.stderr
    assert len(launched) == 2  # started on both workers
    assert shared.is_dir() and not any(shared.iterdir())  # the check leaves output_dir empty for the run


# ---- a probed training process (the runs above) ------------------------------------------------------------


def _train_with_probe(argv: list[str]) -> None:
    """`python -m jaxdiff.train argv`, recording (process, writer) calls and (process, epoch, index) reads."""
    import jax

    from jaxdiff import loop, trainer
    from jaxdiff.data import pipeline
    from jaxdiff.train import main

    events = Path(os.environ[PROBE_ENV]) / f"{os.getpid()}.jsonl"
    lock = threading.Lock()

    def record(**event: object) -> None:
        with lock, events.open("a") as f:
            f.write(json.dumps({"process": jax.process_index(), **event}) + "\n")

    def probed(name: str, writer):
        def call(*args, **kwargs):
            record(call=name)
            return writer(*args, **kwargs)

        return call

    for name in WRITERS:  # patched where the loop and the trainer look them up
        module = trainer if name == "export_pipeline" else loop
        setattr(module, name, probed(name, getattr(module, name)))
    read = pipeline._Examples.__call__

    def read_and_record(self, epoch_and_index):
        epoch, index = epoch_and_index
        record(read=[int(epoch), int(index)])
        return read(self, epoch_and_index)

    pipeline._Examples.__call__ = read_and_record
    main(argv)


if __name__ == "__main__":
    _train_with_probe(sys.argv[1:])
