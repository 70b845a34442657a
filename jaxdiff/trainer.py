"""The one training loop: mesh, input, models, sharded state, compiled step, checkpoints, validation, export.

Reads top to bottom like the run it drives. Everything task-specific (which models, the loss, the sampler)
comes from the task plug-in; the train step is a pure function of (state, frozen, batch), compiled once.
"""

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import adam8bit, cpu_devices, optim, parallel, run
from jaxdiff.checkpoint import Checkpointer, resolve_resume
from jaxdiff.config import TrainConfig
from jaxdiff.data import make_train_iterator, specs_from_config
from jaxdiff.data.dreambooth import ClassImageRequest, complete_class_images
from jaxdiff.hub import HubOptions
from jaxdiff.loop import Pending, TrainLoop
from jaxdiff.metrics import MetricsLogger
from jaxdiff.models.lora import initial_adapters, merge_lora, save_lora_weights
from jaxdiff.publish import check_hub_access, export_pipeline, push_to_hub
from jaxdiff.tasks import TASKS
from jaxdiff.tasks.base import TARGET_SUFFIX, JaxTask

log = logging.getLogger("jaxdiff")

HOST_RANDOMS = "randoms"  # batch key of host-drawn randoms (--random_source host)
CLASS_IMAGE_STREAM = 2**31 - 2  # seed stream of generated class images (validation uses 2**31 - 1)


def split_models(models: dict[str, nnx.Module], trained: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """(graphdefs, trained state, frozen weights, other state) per module name: ``trained[name]`` filters what
    trains in that module (every parameter, or LoRA adapters; nothing for modules not in it); the frozen weights
    are its remaining parameters."""
    graphdefs, params, weights, rest = {}, {}, {}, {}
    for name, module in models.items():
        train_filter = trained.get(name, False)
        graphdefs[name], params[name], weights[name], rest[name] = nnx.split(module, train_filter, nnx.Param, ...)
    return graphdefs, params, weights, rest


def make_optimizer(
    config: TrainConfig, *, total_steps: int, per_device_batch: int, num_devices: int
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule (diffusers' curves) and AdamW with clipping, from the config."""
    lr = optim.scaled_learning_rate(
        config.learning_rate,
        scale_lr=config.scale_lr,
        train_batch_size=per_device_batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_devices=num_devices,
    )
    schedule = optim.lr_schedule(
        config.lr_scheduler,
        learning_rate=lr,
        warmup_steps=config.lr_warmup_steps,
        total_steps=total_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    tx = optim.make_optimizer(
        learning_rate_schedule=schedule,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_weight_decay=config.adam_weight_decay,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        use_8bit=config.use_8bit_adam,
    )
    return schedule, tx


def init_train_state(params: Any, tx: optax.GradientTransformation, *, seed: int, use_ema: bool) -> dict:
    """The train state: parameters, optimizer state, optional EMA copy, step and base RNG key."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
    }
    if use_ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state


def train_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh, *, use_ema: bool) -> dict:
    """Shardings of the train state: parameters by their logical axes, optimizer moments and EMA like the
    parameters they mirror (8-bit Adam's absmax blocks by `adam8bit.state_sharding`), everything else replicated."""
    param_shardings = parallel.state_shardings(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, params)
    shardings = {
        "params": param_shardings,
        "opt_state": optax.tree_utils.tree_map_params(
            tx,
            adam8bit.state_sharding,
            abstract_opt,
            params,
            param_shardings,
            transform_non_params=lambda _: replicated,
        ),
        "step": replicated,
        "rng": replicated,
    }
    if use_ema:
        shardings["ema_params"] = param_shardings
    return shardings


def load_pretrained(task: JaxTask, models: dict[str, nnx.Module], shardings: dict) -> dict[str, nnx.State]:
    """Fills the (abstract) ``models`` in place with the task's pretrained weights, each tensor read from its
    file straight into its sharded device array; returns their parameters."""
    for name, module in models.items():
        task.pretrained[name].load_into(module, shardings[name])
    return {name: nnx.state(module, nnx.Param) for name, module in models.items()}


def _trains_weights(task: JaxTask, name: str) -> bool:
    """Whether module ``name``'s pretrained parameters are trained (full fine-tuning), not frozen."""
    return name in task.trainable and task.train_filter is nnx.Param


def load_frozen(task: JaxTask, mesh: Mesh) -> dict[str, nnx.State]:
    """Every module's frozen weights (frozen modules', and with LoRA the adapted modules' base weights), read into
    the task's modules straight into their sharded arrays: the train step's ``frozen`` argument."""
    models, trained = task_models(task)
    weight_modules = {n: m for n, m in models.items() if not _trains_weights(task, n)}
    shardings = parallel.state_shardings({n: nnx.state(m, nnx.Param) for n, m in weight_modules.items()}, mesh)
    load_pretrained(task, weight_modules, shardings)
    return split_models(models, trained)[2]


def initial_params(task: JaxTask, shardings: dict) -> dict:
    """The trained state a run starts from, placed by ``shardings``: the pretrained weights of the trainable
    modules (read into copies, so the task's modules stay abstract), or with LoRA their adapters' starting values."""
    if task.train_filter is nnx.Param:
        copies = {name: nnx.clone(module) for name, module in task.trainable.items()}
        return load_pretrained(task, copies, shardings)
    host = {name: initial_adapters(module, name, task.config.seed) for name, module in task.trainable.items()}
    return jax.tree.map(
        lambda value, sharding: jax.make_array_from_callback(value.shape, sharding, lambda index: value[index]),
        host,
        shardings,
    )


def task_models(task: JaxTask) -> tuple[dict[str, nnx.Module], dict[str, Any]]:
    """Every module of the task, and what trains in each trainable one (the task's `train_filter`)."""
    return {**task.frozen, **task.trainable}, dict.fromkeys(task.trainable, task.train_filter)


class TrainProgram:
    """What gets compiled, built from abstract shapes alone: optimizer, state shardings, train step, sampler.

    ``step_fn(state, frozen, batch) -> (state, metrics)`` and ``sample_fn`` are jitted over ``mesh``; lowering
    ``step_fn`` with ``abstract_state``, ``abstract_frozen`` and ``task.abstract_batch(...)`` compiles the run's
    step without any weights (``benchmarks/tpu_compile.py`` does so for TPU topologies).
    """

    def __init__(self, config: TrainConfig, task: JaxTask, mesh: Mesh, *, batch_size: int, total_steps: int) -> None:
        self.config, self.task, self.mesh = config, task, mesh
        self.batch_size, self.accum = batch_size, config.gradient_accumulation_steps
        # The state's EMA copy: the fine-tuning EMA (--use_ema) or the task's target network.
        self.ema = config.use_ema or task.target_decay is not None
        self.graphdefs, params, frozen, self.rest = split_models(*task_models(task))
        # Modules that train nothing keep their (empty) trained part out of the train state.
        self.untrained = {name: params.pop(name) for name in list(params) if name not in task.trainable}
        params, frozen = jax.eval_shape(lambda: (params, frozen))
        self.schedule, self.tx = make_optimizer(
            config, total_steps=total_steps, per_device_batch=batch_size // mesh.size, num_devices=mesh.size
        )
        self.frozen_shardings = parallel.state_shardings(frozen, mesh)
        self.state_shardings = train_state_shardings(self.tx, params, mesh, use_ema=self.ema)
        self.abstract_frozen = _with_shardings(frozen, self.frozen_shardings)
        self.abstract_state = _with_shardings(
            jax.eval_shape(lambda p: init_train_state(p, self.tx, seed=0, use_ema=self.ema), params),
            self.state_shardings,
        )
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.step_fn = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )
        self.sample_fn = jax.jit(self._sample)

    def init_state(self, params: dict) -> dict:
        """The train state from the (sharded) pretrained parameters, whose buffers it takes over (donated)."""
        return jax.jit(
            lambda p: init_train_state(p, self.tx, seed=self.config.seed, use_ema=self.ema),
            in_shardings=(self.state_shardings["params"],),
            out_shardings=self.state_shardings,
            donate_argnums=0,
        )(params)

    def models(self, params: dict, frozen: dict) -> dict[str, nnx.Module]:
        """The task's modules holding ``params`` (trained) and ``frozen`` (every module's frozen weights)."""
        trained = {**self.untrained, **params}
        return {n: nnx.merge(self.graphdefs[n], trained[n], frozen[n], self.rest[n]) for n in self.graphdefs}

    def target_models(self, ema_params: dict, frozen: dict) -> dict[str, nnx.Module]:
        """The task's target networks (`target_decay`), ``<name>_target``: each trained module holding its EMA,
        under stop-gradient and without gradient checkpointing (they run forward only); none for other tasks.
        Built inside the traced loss, as `models` is (NNX lifts no module across trace levels)."""
        if self.task.target_decay is None:
            return {}
        ema = jax.lax.stop_gradient(ema_params)
        targets = {}
        for name in self.task.trainable:
            targets[name + TARGET_SUFFIX] = module = nnx.merge(
                self.graphdefs[name], ema[name], frozen[name], self.rest[name]
            )
            module.set_attributes(gradient_checkpointing=False, raise_if_not_found=False)
        return targets

    def eval_models(self, params: dict, frozen: dict) -> dict[str, nnx.Module]:
        """`models` for inference: no gradient checkpointing (nothing to rematerialise, and NNX cannot lift a
        remat inside the sampler's loop)."""
        models = self.models(params, frozen)
        for module in models.values():
            module.set_attributes(gradient_checkpointing=False, raise_if_not_found=False)
        return models

    def _sample(self, params: dict, frozen: dict, ids: dict, rng: jax.Array) -> jax.Array:
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # as in the step: constraints, kernels
            return self.task.sample(self.eval_models(params, frozen), ids, rng)

    def _train_step(self, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # the models' activation constraints
            return self._step(state, frozen, batch)

    def _step(self, state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        cfg = self.config
        step = state["step"]
        batch = dict(batch)
        randoms = batch.pop(HOST_RANDOMS, None)
        if randoms is None:
            rows = self.batch_size * self.accum
            randoms = self.task.draw(jax.random.fold_in(state["rng"], step), rows)
            if jax.process_count() > 1:  # draws follow global positions, as on one process
                randoms = jax.tree.map(lambda x: x[run.host_major_positions(rows, jax.process_count())], randoms)

        ema_params = state.get("ema_params")

        def loss(params: dict, micro_batch: dict, micro_randoms: dict) -> tuple[jax.Array, dict]:
            targets = self.target_models(ema_params, frozen) if self.ema else {}
            return self.task.loss({**self.models(params, frozen), **targets}, micro_batch, micro_randoms)

        def loss_and_grad(params: dict, micro: tuple[dict, dict]) -> tuple[dict, dict]:
            (loss_value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, *micro)
            return {**metrics, "loss": loss_value}, grads

        micro = optim.split_micro_batches((batch, randoms), self.accum)
        values, grads = optim.accumulate_gradients(loss_and_grad, state["params"], micro)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state, step=step + 1)
        if self.ema:
            decay = self.task.target_decay or optim.ema_decay(
                step + 1,
                max_decay=cfg.ema_decay or run.EMA_DEFAULT_DECAY,
                use_warmup=cfg.ema_use_warmup,
                inv_gamma=cfg.ema_inv_gamma,
                power=cfg.ema_power,
            )
            new["ema_params"] = optim.ema_update(state["ema_params"], new["params"], decay)
        metrics = {**values, "grad_norm": optax.global_norm(grads), "lr": self.schedule(step)}
        return new, metrics


def _with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree`` carrying the matching ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Trainer(TrainLoop):
    """Builds everything a run needs from the config; `train()` (jaxdiff.loop) runs it."""

    def __init__(self, config: TrainConfig) -> None:
        parallel.maybe_initialize_distributed(config)
        # Each process drew its own seed when --seed was unset: process 0's is the run's (and config.yaml's).
        config = self.config = config.model_copy(update={"seed": parallel.shared_seed(config.seed)})
        # Process 0 alone writes config.yaml, metrics, samples and the export (and uploads it).
        self.is_main = jax.process_index() == 0
        run.check_output_dir(config)
        if self.is_main:
            check_hub_access(config.push_to_hub, config.hub_model_id)
        parallel.barrier("output_dir checked")  # on every process, before any process writes into it
        self.out = Path(config.output_dir)

        # Mesh and batch.
        self.mesh = parallel.make_mesh(config.mesh)
        self.batch_size = parallel.global_batch_size(config.train_batch_size, config.global_batch_size, self.mesh)
        if cpu_devices.split_count():
            log.info(
                "CPU host: %d XLA devices, one per core; each step's batch of %d is split over them",
                self.mesh.size,
                self.batch_size,
            )
        self.accum = config.gradient_accumulation_steps

        # Task: models (abstract: configs read, no weights yet), loss, sampler.
        self.task = TASKS[config.task](config)
        for weights_file in self.task.pretrained.values():
            weights_file.state_dict()  # missing weight files fail now, before the data is read or encoded
        self.frozen = load_frozen(self.task, self.mesh)
        request = self.task.images_to_generate
        if request is not None:
            self.generate_images(request)

        # Input: each optimizer step consumes `accum` micro-batches, delivered as one batch.
        self.samples_per_step = self.batch_size * self.accum
        source, transform, loader = specs_from_config(config, self.samples_per_step)
        cache = run.open_latent_cache(config, self.task, source, transform, self.batch_size)
        self.data = make_train_iterator(source, transform, loader, self.task.tokenizers, latent_cache=cache)
        self.max_steps = run.max_train_steps(config, self.data.samples_per_epoch, self.samples_per_step)

        # Optimizer, shardings and the compiled step; then the state: from a checkpoint, else from the pretrained
        # weights (never both, so only one copy of the state is ever on the devices).
        self.program = TrainProgram(
            config, self.task, self.mesh, batch_size=self.batch_size, total_steps=self.max_steps
        )
        self.checkpointer = Checkpointer(
            self.out / "checkpoints",
            save_interval_steps=config.checkpointing_steps,
            max_to_keep=config.checkpoints_total_limit,
        )
        resume = resolve_resume(config.resume_from_checkpoint, self.out / "checkpoints")
        if resume is None:
            log.info("starting from the initial weights (no checkpoint to resume from)")
            self.state = self.program.init_state(initial_params(self.task, self.program.state_shardings["params"]))
            self.start_step = 0
        else:
            path, self.start_step = resume
            self.state, data_state = self.checkpointer.restore(
                self.start_step, self.program.abstract_state, directory=path.parent
            )
            self.data.set_state(data_state)
            log.info("resumed from step %d", self.start_step)
        self.batch_sharding = self.program.batch_sharding
        self._step_fn: Any = None

    def generate_images(self, request: ClassImageRequest) -> None:
        """The task's missing images (DreamBooth's class images), sampled from the base model as validation images
        are, one batch at a time over the whole mesh (padded to a multiple of its devices). Every process takes
        part in each batch and writes the same files, so hosts without a shared disk get them too."""
        cfg = self.config
        missing = request.missing_batches()
        parallel.barrier("class images counted")  # before any process writes
        if not missing:
            return
        program = TrainProgram(cfg, self.task, self.mesh, batch_size=self.mesh.size, total_steps=1)
        params = initial_params(self.task, program.state_shardings["params"])
        rows = -(-request.batch_size // self.mesh.size) * self.mesh.size
        sharding = program.batch_sharding
        ids = {
            k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in self.task.tokenize([request.prompt] * rows).items()
        }
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), CLASS_IMAGE_STREAM)

        def generate(batch: int) -> np.ndarray:
            return parallel.to_host(program.sample_fn(params, self.frozen, ids, jax.random.fold_in(key, batch)))

        complete_class_images(request, generate, missing)
        parallel.barrier("class images written")

    def host_batch(self, step: int) -> dict[str, Any]:
        """This host's next batch; with ``--random_source host``, also the step's randoms (its rows of them)."""
        batch: dict[str, Any] = next(self.data)
        if self.config.random_source == "host":
            draws = self.task.draw_host(step, self.samples_per_step)
            batch[HOST_RANDOMS] = run.process_rows(draws, jax.process_index(), jax.process_count())
        return batch

    def global_batch(self, host_batch: dict[str, Any]) -> dict[str, Any]:
        """The global batch array(s) from each host's rows, sharded over the mesh's batch axes."""
        return jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)), host_batch
        )

    # ---- validation and export ---------------------------------------------------------------------------

    def _params_for_eval(self) -> dict:
        use_ema = self.config.use_ema and self.config.export_ema
        return self.state["ema_params"] if use_ema else self.state["params"]

    def validate(self, step: int, metrics_logger: MetricsLogger) -> None:
        """Sample every validation prompt with the current (EMA) weights; save PNG grids and log them.

        Every process samples (one computation over the mesh); process 0 gathers the images and writes them."""
        cfg = self.config
        prompts = run.validation_prompts(cfg)
        if not prompts:
            return
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2**31 - 1)
        grids = []
        for i, prompt in enumerate(prompts):
            ids = self.task.tokenize([prompt] * cfg.num_validation_images)
            images = self.program.sample_fn(self._params_for_eval(), self.frozen, ids, jax.random.fold_in(rng, i))
            grids.append(parallel.to_host(images))
        if not self.is_main:
            return
        self.write_validation(step, grids, metrics_logger)

    def export(self) -> None:
        """The final diffusers pipeline at output_dir: trained components written, the rest copied through.

        Every process takes part in gathering the weights; process 0 writes (and uploads) them while the others
        wait, so no process ends before the export is whole."""
        targets = self.state["ema_params"] if self.task.target_decay is not None else None
        export_trained(
            self.task, self._params_for_eval(), self.out, self.config.export_dtype, targets=targets, write=self.is_main
        )
        if self.is_main and self.config.push_to_hub:
            push_to_hub(
                self.out,
                self.config.hub_model_id,
                token=self.config.hub_token,
                ignore=run.hub_ignore(self.config),
            )
        parallel.barrier("exported")

    # ---- the loop's hooks (jaxdiff.loop runs them) ---------------------------------------------------------

    def checkpoints(self) -> Checkpointer:
        return self.checkpointer

    def run_step(self, step: int) -> dict[str, Any]:
        batch = self.global_batch(self.host_batch(step))
        if self._step_fn is None:
            self._step_fn = self.compile_step(batch)
        self.state, metrics = self._step_fn(self.state, self.frozen, batch)
        return metrics

    def compile_step(self, batch: dict[str, jax.Array]) -> Any:
        """Compile the step ahead of time, once, and log what XLA says it needs."""
        compiled = self.program.step_fn.lower(self.state, self.frozen, batch).compile()
        log.info("compiled train step; memory analysis: %s", compiled.memory_analysis())
        parallel.barrier("train step compiled")  # hosts start the first step's collectives together
        return compiled

    def fetch_metrics(self, pending: Pending) -> list[tuple[int, dict[str, float]]]:
        fetched = jax.device_get([m for _, m in pending])
        return [
            (step, {k: float(v) for k, v in values.items()})
            for (step, _), values in zip(pending, fetched, strict=True)
        ]

    def save_checkpoint(self, step: int, *, force: bool = False) -> None:
        self.checkpointer.save(step, self.state, self.data.get_state(), force=force)

    def should_validate(self, step: int, epochs_before: int) -> bool:
        """By epochs, process 0's count decides (hosts that skipped different numbers of samples, or read
        different shards of a stream, may disagree on when an epoch ended)."""
        decision = super().should_validate(step, epochs_before)
        by_epochs = self.config.validation_epochs and not self.config.validation_steps
        return parallel.process_zero_decides(decision) if by_epochs else decision

    def should_export(self, step: int, epochs_before: int) -> bool:
        """Process 0's epoch count decides, as for `should_validate`."""
        decision = super().should_export(step, epochs_before)
        return parallel.process_zero_decides(decision) if self.config.save_model_epochs else decision


def export_trained(
    task: JaxTask, params: dict, output_dir: Path, dtype: str, *, targets: dict | None = None, write: bool = True
) -> None:
    """Write the task's trained modules, holding ``params``, at ``output_dir``: a diffusers pipeline (and the target
    networks, holding ``targets``, as ``<name>_target/`` beside it), or with LoRA the adapters'
    ``pytorch_lora_weights.safetensors`` (float32; with --output_kohya_format the kohya file too, with --merge_lora
    also the pipeline of the merged weights, which needs the task's modules to hold their base weights).

    With several processes every one calls it (the parameters are gathered from all hosts) and only the one
    with ``write`` writes."""
    cfg = task.config
    host_params, host_targets = parallel.to_host((params, targets))
    merge = task.lora is not None and cfg.merge_lora
    base = parallel.to_host({n: nnx.state(m, nnx.Param) for n, m in task.trainable.items()}) if merge else None
    if not write:
        return
    components = {}
    for name, module in task.trainable.items():
        nnx.update(module, host_params[name])
        components[name] = module
    if task.lora is not None:
        save_lora_weights(output_dir, components, task.lora, kohya=cfg.output_kohya_format)
        if not merge:
            return
        for name, module in components.items():
            nnx.update(module, base[name])
            merge_lora(module)
    extras = {}
    for name, module in task.trainable.items() if host_targets is not None else ():
        extras[name + TARGET_SUFFIX] = target = nnx.clone(module)
        nnx.update(target, host_targets[name])
    options = HubOptions.from_config(cfg)
    components.update(task.copied_components)
    export_pipeline(
        output_dir,
        base_model=task.model_path,
        components=components,
        extras=extras,
        dtype=dtype,
        options=options,
        pipeline_class=task.export_pipeline_class,
    )


def export_checkpoint(config: TrainConfig, checkpoint: Path, output_dir: Path, *, use_ema: bool, dtype: str) -> None:
    """A checkpoint step folder of this backend as a diffusers pipeline (or LoRA file) at ``output_dir`` (EMA or
    raw weights); what ``python -m jaxdiff.export`` runs for a run whose config says ``backend: jax``."""
    task = TASKS[config.task](config)
    mesh = parallel.make_mesh(None)
    program = TrainProgram(config, task, mesh, batch_size=jax.device_count(), total_steps=1)
    with Checkpointer(checkpoint.parent, save_interval_steps=1) as checkpointer:
        state, _ = checkpointer.restore(int(checkpoint.name), program.abstract_state, directory=checkpoint.parent)
    if task.lora is not None and config.merge_lora:
        load_frozen(task, mesh)  # the base weights the adapters merge into
    targets = state["ema_params"] if task.target_decay is not None else None
    export_trained(task, state["ema_params" if use_ema else "params"], output_dir, dtype, targets=targets)


def train(config: TrainConfig) -> None:
    """Entry point for the JAX backend."""
    Trainer(config).train()
