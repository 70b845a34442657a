"""The torch backend's one training loop: jaxdiff.trainer's run with diffusers models and accelerate.

Reads top to bottom like the JAX trainer and keeps its contract: the same data order (each optimizer step reads
one batch of batch x processes x accumulation and splits it into micro-batches the same way), the same LR curves,
EMA schedule and metrics, ``checkpoints/<step>/``, ``samples/``, ``metrics.jsonl`` and the final diffusers pipeline
at ``output_dir``. Everything task-specific comes from the task plug-in (``torch_backend.tasks``).
"""

import contextlib
import copy
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from jaxdiff import run
from jaxdiff.checkpoint import PreemptionGuard, resolve_resume
from jaxdiff.config import ConfigError, TrainConfig
from jaxdiff.data import make_train_iterator, specs_from_config
from jaxdiff.data.dreambooth import ClassImageRequest, complete_class_images
from jaxdiff.hub import HubOptions
from jaxdiff.loop import Pending, TrainLoop
from jaxdiff.metrics import MetricsLogger
from jaxdiff.optim import scaled_learning_rate
from jaxdiff.publish import check_hub_access, export_pipeline, push_to_hub
from jaxdiff.tasks.base import TARGET_SUFFIX
from torch_backend.checkpoint import TorchCheckpointer
from torch_backend.lora import merge_lora, save_lora_weights
from torch_backend.tasks import TASKS, TorchTask

log = logging.getLogger("jaxdiff")

#: Seed streams of the validation and the generated class images (the training draws use (seed, step, process)).
VALIDATION_STREAM = 2**31 - 1
CLASS_IMAGE_STREAM = 2**31 - 2


def derived_seed(*values: int) -> int:
    """A 64-bit torch seed from integers (seed, step, ...): independent streams without stored generator state."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


def check_torch_features(config: TrainConfig) -> None:
    """Refuses, before anything loads, the GPU features this machine cannot provide, with one clear message."""
    if config.enable_xformers_memory_efficient_attention:
        missing = []
        try:
            import xformers  # noqa: F401
        except ImportError:
            missing.append("the xformers package is not installed (pip install xformers)")
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible to torch")
        if missing:
            raise ConfigError(
                "--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU, but "
                f"{' and '.join(missing)}; drop the flag to use PyTorch's scaled-dot-product attention (the default)"
            )
    if config.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision fp16 needs a CUDA GPU on the torch backend; use bf16 or no on CPU")


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], *, num_processes: int) -> Any:
    """AdamW (bitsandbytes' 8-bit AdamW with --use_8bit_adam) at the (--scale_lr scaled) learning rate."""
    lr = scaled_learning_rate(
        config.learning_rate,
        scale_lr=config.scale_lr,
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_devices=num_processes,
    )
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    return adamw(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The modules in eval mode (no LoRA dropout) while inside, then back in the mode each was in."""
    modes = [(module, module.training) for module in modules]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A dict of numpy arrays (a data batch, host draws) as tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


class Trainer(TrainLoop):
    """Builds everything a run needs from the config; `train()` (jaxdiff.loop) runs it."""

    jax_preemption_sync = False

    def __init__(self, config: TrainConfig) -> None:
        check_torch_features(config)
        run.check_output_dir(config)
        check_hub_access(config.push_to_hub, config.hub_model_id)
        self.out = Path(config.output_dir)
        # The LR scheduler is stepped by the loop once per optimizer step, as optax's count.
        self.accelerator = acc = Accelerator(
            mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False
        )
        acc.wait_for_everyone()  # every process checked output_dir before the main one writes to it
        if acc.num_processes > 1:  # a seed drawn at start (none given) differs per process: use the main one's
            config = config.model_copy(update={"seed": broadcast_object_list([config.seed])[0]})
        self.config = config
        set_seed(config.seed)
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Task: models (frozen ones already in the compute dtype, on the device), loss, sampler.
        self.task = TASKS[config.task](config, acc.device)
        if config.enable_xformers_memory_efficient_attention:
            for module in (*self.task.trainable.values(), *self.task.frozen.values()):
                if hasattr(module, "enable_xformers_memory_efficient_attention"):
                    module.enable_xformers_memory_efficient_attention()
        request = self.task.images_to_generate
        if request is not None:
            self.generate_images(request)

        # Input: each optimizer step consumes `accum` micro-batches per process, delivered as one batch.
        self.accum = config.gradient_accumulation_steps
        self.samples_per_step = config.train_batch_size * acc.num_processes * self.accum
        source, transform, loader = specs_from_config(config, self.samples_per_step)
        with acc.main_process_first():  # the main process encodes the cache; the others then open it
            cache = run.open_latent_cache(config, self.task, source, transform, config.train_batch_size)
        self.data = make_train_iterator(
            source,
            transform,
            loader,
            self.task.tokenizers,
            latent_cache=cache,
            process_index=acc.process_index,
            process_count=acc.num_processes,
        )
        self.max_steps = run.max_train_steps(config, self.data.samples_per_epoch, self.samples_per_step)

        # Optimizer, schedule (diffusers' curves, equal to jaxdiff.optim.lr_schedule), EMA and target networks.
        names = list(self.task.trainable)
        self.targets = target_networks(self.task)
        self.params = trained_parameters(self.task)
        optimizer = make_optimizer(config, self.params, num_processes=acc.num_processes)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=self.max_steps,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        *modules, self.optimizer, self.lr_scheduler = acc.prepare(
            *self.task.trainable.values(), optimizer, lr_scheduler
        )
        self.trained = dict(zip(names, modules, strict=True))
        self.models = {**self.task.frozen, **self.trained, **self.targets}
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(
                self.params,
                decay=config.ema_decay or run.EMA_DEFAULT_DECAY,
                use_ema_warmup=config.ema_use_warmup,
                inv_gamma=config.ema_inv_gamma,
                power=config.ema_power,
            )
            acc.register_for_checkpointing(self.ema)
        for target in self.targets.values():
            acc.register_for_checkpointing(target)

        # Checkpoints, and the position to continue from (accelerate restores models, optimizer and EMA).
        self.checkpointer = TorchCheckpointer(
            acc,
            self.out / "checkpoints",
            save_interval_steps=config.checkpointing_steps,
            max_to_keep=config.checkpoints_total_limit,
            trained_only=self.task.lora is not None,
        )
        self.is_main, self.start_step = acc.is_main_process, 0
        resume = resolve_resume(config.resume_from_checkpoint, self.out / "checkpoints")
        if resume is None:
            log.info("starting from the initial weights (no checkpoint to resume from)")
        else:
            path, self.start_step = resume
            self.data.set_state(self.checkpointer.restore(path))
            log.info("resumed from step %d", self.start_step)

    def generate_images(self, request: ClassImageRequest) -> None:
        """The task's missing images (DreamBooth's class images), sampled from the base model as validation images
        are; the processes share the batches round robin."""
        acc, cfg = self.accelerator, self.config
        missing = request.missing_batches()
        acc.wait_for_everyone()  # every process counted before any writes
        models = {**self.task.frozen, **self.task.trainable}

        def generate(batch: int) -> np.ndarray:
            generator = torch.Generator(acc.device).manual_seed(derived_seed(cfg.seed, CLASS_IMAGE_STREAM, batch))
            return self.task.sample(models, request.prompt, request.batch_size, generator)

        with eval_mode(models.values()), acc.autocast():
            complete_class_images(request, generate, missing, sorted(missing)[acc.process_index :: acc.num_processes])
        acc.wait_for_everyone()

    # ---- the step ----------------------------------------------------------------------------------------

    def inputs(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This process's next batch and the step's random numbers for its rows, on the device."""
        acc, device = self.accelerator, self.accelerator.device
        batch = to_tensors(next(self.data), device)
        rows = len(next(iter(batch.values())))
        if self.config.random_source == "host":  # the global batch's draws; this process's rows
            draws = self.task.draw_host(step, self.samples_per_step)
            randoms = to_tensors(run.process_rows(draws, acc.process_index, acc.num_processes), device)
        else:
            generator = torch.Generator(device).manual_seed(derived_seed(self.config.seed, step, acc.process_index))
            randoms = self.task.draw(generator, rows)
        return batch, randoms

    def train_step(self, batch: dict[str, torch.Tensor], randoms: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step: mean loss and gradients over the micro-batches, clipping, AdamW, schedule, EMA.

        Micro-batch i takes rows i, i + k, i + 2k, ... (jaxdiff.optim.split_micro_batches), so accumulation sees
        the samples and draws the JAX backend sees. Gradients are synchronised once, after the last micro-batch.
        """
        acc, cfg = self.accelerator, self.config
        lr = self.lr_scheduler.get_last_lr()[0]
        sums: dict[str, torch.Tensor] = {}
        for i in range(self.accum):
            micro_batch = {k: v[i :: self.accum] for k, v in batch.items()}
            micro_randoms = {k: v[i :: self.accum] for k, v in randoms.items()}
            with contextlib.ExitStack() as stack:
                if i < self.accum - 1:
                    for module in self.trained.values():
                        stack.enter_context(acc.no_sync(module))
                loss, metrics = self.task.loss(self.models, micro_batch, micro_randoms)
                acc.backward(loss / self.accum)
            for name, value in {**metrics, "loss": loss}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.update_targets()
        means = {name: total / self.accum for name, total in sums.items()}
        return {**means, "grad_norm": grad_norm.detach().float(), "lr": lr}

    @torch.no_grad()
    def update_targets(self) -> None:
        """One EMA step of each target network towards its trained module, ``ema - (1 - decay) (ema - params)``
        (jaxdiff.optim.ema_update's formula)."""
        rate = 1.0 - (self.task.target_decay or 0.0)
        for name, target in self.targets.items():
            source = self.accelerator.unwrap_model(self.trained[name.removesuffix(TARGET_SUFFIX)])
            for ema, param in zip(target.parameters(), source.parameters(), strict=True):
                ema.sub_(ema - param, alpha=rate)

    # ---- validation and export ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[dict[str, torch.nn.Module]]:
        """The unwrapped models, holding the EMA weights while inside when they are the ones exported."""
        use_ema = self.ema is not None and self.config.export_ema
        if use_ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        trained = {n: self.accelerator.unwrap_model(m) for n, m in self.trained.items()}
        try:
            with eval_mode(trained.values()):
                yield {**self.task.frozen, **trained}
        finally:
            if use_ema:
                self.ema.restore(self.params)

    def validate(self, step: int, metrics_logger: MetricsLogger) -> None:
        """Sample every validation prompt with the current (EMA) weights on the main process; save PNG grids."""
        cfg, acc = self.config, self.accelerator
        prompts = run.validation_prompts(cfg)
        if not prompts:
            return
        if acc.is_main_process:
            grids = []
            with self.eval_weights() as models, acc.autocast():
                for i, prompt in enumerate(prompts):
                    generator = torch.Generator(acc.device).manual_seed(derived_seed(cfg.seed, VALIDATION_STREAM, i))
                    grids.append(self.task.sample(models, prompt, cfg.num_validation_images, generator))
            self.write_validation(step, grids, metrics_logger)
        acc.wait_for_everyone()

    def export(self) -> None:
        """The final export at output_dir (`export_trained`), on the main process."""
        cfg, acc = self.config, self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            with self.eval_weights() as models:
                trained = {name: models[name] for name in self.trained}
                export_trained(self.task, trained, self.out, cfg.export_dtype, targets=self.targets)
            if cfg.push_to_hub:
                push_to_hub(self.out, cfg.hub_model_id, token=cfg.hub_token, ignore=run.hub_ignore(cfg))
        acc.wait_for_everyone()

    # ---- the loop's hooks (jaxdiff.loop runs them) ---------------------------------------------------------

    def run_step(self, step: int) -> dict[str, Any]:
        return self.train_step(*self.inputs(step))

    def fetch_metrics(self, pending: Pending) -> list[tuple[int, dict[str, float]]]:
        # The loss and the task's metrics are each process's means: averaged over processes. The gradient norm
        # (of the synchronised gradients) and the LR are the same on every process.
        names = [name for name in pending[0][1] if name not in ("grad_norm", "lr")]
        means = torch.stack([torch.stack([metrics[name] for name in names]) for _, metrics in pending])
        means = self.accelerator.reduce(means, reduction="mean")
        grad_norms = torch.stack([metrics["grad_norm"] for _, metrics in pending])
        rows = torch.cat([means, grad_norms[:, None]], dim=1).cpu().tolist()  # one device sync
        return [
            (step, {**dict(zip(names, row[:-1], strict=True)), "grad_norm": row[-1], "lr": metrics["lr"]})
            for (step, metrics), row in zip(pending, rows, strict=True)
        ]

    def save_checkpoint(self, step: int, *, force: bool = False) -> None:
        self.checkpointer.save(step, self.data.get_state(), force=force)

    def should_stop(self, preemption: PreemptionGuard, step: int) -> bool:
        stop = preemption.should_stop(step)
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(stop), device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop


def trained_parameters(task: TorchTask) -> list[torch.nn.Parameter]:
    """The parameters the optimizer and EMA update, in a fixed order: every parameter of the task's trainable
    modules, or with LoRA only their adapters'."""
    return [p for m in task.trainable.values() for p in m.parameters() if p.requires_grad]


def target_networks(task: TorchTask) -> dict[str, torch.nn.Module]:
    """The task's target networks (`target_decay`, LCM's): a frozen copy of each trained module, ``<name>_target``,
    which the loss reads and `Trainer.update_targets` moves; none for other tasks."""
    if task.target_decay is None:
        return {}
    return {f"{n}{TARGET_SUFFIX}": copy.deepcopy(m).requires_grad_(False) for n, m in task.trainable.items()}


def export_trained(
    task: TorchTask,
    trained: dict[str, torch.nn.Module],
    output_dir: Path,
    dtype: str,
    targets: dict[str, torch.nn.Module] | None = None,
) -> None:
    """The trained (unwrapped) modules at ``output_dir``: a diffusers pipeline (trained components written, the
    rest copied through, the ``targets`` networks beside it as ``<name>_target/``), or with LoRA the adapters'
    ``pytorch_lora_weights.safetensors`` (with --output_kohya_format the kohya file too, with --merge_lora also the
    pipeline of the merged weights; merging leaves the modules merged)."""
    cfg = task.config
    if task.lora is not None:
        save_lora_weights(output_dir, trained, task.lora, kohya=cfg.output_kohya_format)
        if not cfg.merge_lora:
            return
        for module in trained.values():
            merge_lora(module)
    components = trained | task.copied_components
    options = HubOptions.from_config(cfg)
    export_pipeline(
        output_dir,
        base_model=task.model_path,
        components=components,
        extras=targets,
        dtype=dtype,
        options=options,
        pipeline_class=task.export_pipeline_class,
    )


def export_checkpoint(config: TrainConfig, checkpoint: Path, output_dir: Path, *, use_ema: bool, dtype: str) -> None:
    """A torch-backend checkpoint step folder as a diffusers pipeline at ``output_dir`` (EMA or raw weights);
    what ``python -m jaxdiff.export`` runs for a run whose config says ``backend: torch``."""
    accelerator = Accelerator(cpu=True)
    task = TASKS[config.task](config, accelerator.device)
    modules = [accelerator.prepare_model(m) for m in task.trainable.values()]  # registered in the trainer's order
    params = trained_parameters(task)
    ema = EMAModel(params) if config.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    targets = target_networks(task)
    for target in targets.values():
        accelerator.register_for_checkpointing(target)
    accelerator.load_state(str(checkpoint), strict=task.lora is None)  # LoRA checkpoints hold adapters only
    if use_ema:
        ema.copy_to(params)
    trained = {name: accelerator.unwrap_model(m) for name, m in zip(task.trainable, modules, strict=True)}
    export_trained(task, trained, output_dir, dtype, targets)


def train(config: TrainConfig) -> None:
    """Entry point for the torch backend."""
    Trainer(config).train()
