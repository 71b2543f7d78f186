"""Training and evaluation: the steps, the loop of one stage, and a whole experiment.

One step, `train_step`, serves every stage (the paper's Algorithm 1 and the baselines):
- main task: softmax cross-entropy on labels (teacher, stage 2, scratch baselines),
  optionally plus a distiller's term (Hinton KD in FitNet's stage 2);
- stage 1: a distiller's objective only (FSP's Eq. 2, FitNet's hint), no labels.
The distiller (`fsp_jax.distillers`) is a parameter: the step does not know which
method it runs. The teacher is frozen (an input, never differentiated; BN in inference
mode).

Data parallelism is `jax.jit` over a `Mesh` with the batch sharded along 'data' and the
state replicated: XLA inserts the gradient all-reduce and computes BatchNorm statistics
over the global batch (no `axis_name`, no pmap).

`train_and_evaluate(exp, stage)` trains and evaluates one stage, resuming from its
last checkpoint; `run(config, workdir)` runs (or resumes) every stage of a config. The
data order depends only on the step, so a resumed stage computes what an uninterrupted
one would. A kill (even SIGKILL, even mid-save) loses at most the steps since the last
complete checkpoint; SIGTERM and non-finite losses: `fsp_jax.guards`. Several
processes: every process runs the same steps and calls every Orbax save and restore;
JSON files and logs come from process 0 only.
"""
from __future__ import annotations

import functools
import logging
import operator
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils

from fsp_jax import checkpoints, data, guards, metrics, stages
from fsp_jax.validation import ConfigError
from fsp_jax import workdir as workdir_lib
from fsp_jax.models import Network

log = logging.getLogger("fsp_jax")


class TrainState(train_state.TrainState):
  """Optimizer state and BatchNorm running statistics of a stage.

  `params` is always `{'student': ..., 'distiller': ...}`: the trained network's
  parameters and its stage's distiller's own (a FitNet regressor, FSP adapters; `{}`
  for most stages), trained by one optimizer. `variables` is the network alone, what
  the next stage restores. (The stage's network is the student's, or the teacher's
  for the teacher stage and the `teacher_short` baseline.)
  """
  batch_stats: Any = None

  @property
  def variables(self) -> Dict[str, Any]:
    return {"params": self.params["student"], "batch_stats": self.batch_stats}

  @property
  def distiller_params(self):
    return self.params["distiller"]


def create_learning_rate_fn(learning_rates: Sequence[float], boundaries: Sequence[int],
                            warmup_steps: int = 0) -> Callable[[jax.Array], jax.Array]:
  """Piecewise-constant learning rate in iterations, as the paper states schedules.

  `learning_rates[k]` holds for `boundaries[k-1] <= step < boundaries[k]`; e.g.
  (0.1, 0.01, 0.001) with boundaries (32000, 48000). `warmup_steps` W > 0 multiplies
  the first W steps' rates by (step + 1) / W (a linear warm-up; not in the paper).
  """
  if len(learning_rates) != len(boundaries) + 1:
    raise ConfigError(f"{len(learning_rates)} learning rates need {len(learning_rates) - 1} "
                     f"boundaries; got {len(boundaries)}.")
  values = jnp.asarray(learning_rates, jnp.float32)
  bounds = jnp.asarray(boundaries, jnp.int32)

  def schedule(step):
    lr = values[jnp.sum(step >= bounds)]
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return lr
  return schedule


def create_optimizer(learning_rate_fn, momentum: float,
                     weight_decay: float) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (PyTorch's SGD):
  g' = g + wd * w; v = momentum * v + g'; w = w - lr * v."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate_fn, momentum=momentum))


def create_train_state(network: Network, variables, tx, distiller_params=None) -> TrainState:
  params = {"student": variables["params"], "distiller": distiller_params or {}}
  return TrainState.create(apply_fn=network.apply, params=params, tx=tx,
                           batch_stats=variables["batch_stats"])


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; logits `(B, K)`, integer labels `(B,)`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def teacher_targets(teacher: Network, teacher_variables, images, distiller):
  """What `distiller` takes from the frozen teacher (BN in inference mode) for uint8
  `images` `(B, H, W, C)`; no gradient."""
  logits, features = teacher.apply(teacher_variables, images)
  return jax.lax.stop_gradient(distiller.teacher_targets(logits, features))


def train_step(state: TrainState, batch, teacher_variables=None, *, student: Network,
               teacher: Optional[Network] = None, distiller=None,
               use_labels: bool = True):
  """One SGD step of every kind of stage. Returns the new state and metrics.

  Loss = cross-entropy on labels (where `use_labels`) + the batch mean of
  `distiller.objective` (where a distiller is given). Only `state.params` (the student
  and the distiller's own parameters) are differentiated; the teacher's variables are
  an input, and its BatchNorm runs in inference mode (its statistics do not move).

  Args:
    state: the stage's TrainState.
    batch: `{'image': uint8 (B, H, W, C), 'label': int32 (B,)}`; with
      `'teacher_targets'` (the teacher's, cached per example) the teacher is not run.
    teacher_variables: the frozen teacher's `{'params', 'batch_stats'}`, or None.
    student: the network `state` trains.
    teacher: the teacher's network (where a distiller reads it).
    distiller: a `fsp_jax.distillers` method, or None for plain classification.
    use_labels: add the main-task cross-entropy (False for stage 1).

  Returns:
    `(state, metrics)`; metrics hold `loss` (the total), `accuracy` where labels are
    used, and each term (`task_loss`, `<distiller>_loss`) where there are two.
  """
  if not use_labels and distiller is None:
    raise ValueError("a step with neither labels nor a distiller has no loss.")
  images = batch["image"]
  targets = batch.get("teacher_targets")
  if distiller is not None and targets is None:
    if teacher is None or teacher_variables is None:
      raise ValueError("a distillation step needs the teacher (teacher= and "
                       "teacher_variables) or its cached batch['teacher_targets'].")
    targets = teacher_targets(teacher, teacher_variables, images, distiller)

  def loss_fn(params):
    (logits, features), batch_stats = student.apply(
        {"params": params["student"], "batch_stats": state.batch_stats}, images,
        train=True)
    terms = {}
    if use_labels:
      terms["task_loss"] = cross_entropy_loss(logits, batch["label"])
    if distiller is not None:
      terms[f"{distiller.name}_loss"] = jnp.mean(distiller.objective(
          params["distiller"], targets, logits, features, state.step))
    # A single term is the loss itself (no `0 +`).
    loss = functools.reduce(operator.add, terms.values())
    return loss, (logits, batch_stats, terms)

  (loss, (logits, batch_stats, terms)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  out = {"loss": loss}
  if use_labels:
    out["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  if len(terms) > 1:
    out.update(terms)
  return state, out


def eval_classify_step(variables, batch, *, network: Network):
  """Sums over the real (mask 1) examples: correct predictions, loss, count."""
  logits, _ = network.apply(variables, batch["image"])
  mask = batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(losses * mask),
          "count": jnp.sum(mask)}


def eval_distill_step(variables, distiller_params, teacher_variables, batch, *,
                      network: Network, teacher: Network, distiller):
  """Sum over real (mask 1) examples of the distiller's objective (student in
  inference mode): `{'<distiller>_loss', 'count'}`."""
  logits, features = network.apply(variables, batch["image"])
  targets = teacher_targets(teacher, teacher_variables, batch["image"], distiller)
  per_example = distiller.objective(distiller_params, targets, logits, features, 0)
  mask = batch["mask"]
  return {f"{distiller.name}_loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}


# The jitted steps, one compilation per (network, distiller): the loop and the
# benchmarks run the very same compiled functions. The state is donated: XLA updates
# parameters and optimizer state in place instead of copying them every step.
def jit_train_step(student: Network, teacher: Optional[Network] = None, distiller=None,
                   use_labels: bool = True):
  """`train_step` as `(state, batch, teacher_variables) -> (state, metrics)`."""
  return _jit_train_step(student, teacher, distiller, use_labels)


@functools.lru_cache(maxsize=None)
def _jit_train_step(student, teacher, distiller, use_labels):
  return jax.jit(functools.partial(train_step, student=student, teacher=teacher,
                                   distiller=distiller, use_labels=use_labels),
                 donate_argnums=0)


def resolve_seed_axis(seed_axis: str) -> str:
  """'vmap' or 'unrolled' for `config.seed_axis` ('auto': by backend, measured).

  vmap turns each convolution of S seeds' weights into one grouped convolution,
  which XLA:CPU runs 4.6-5.7x slower than S plain ones (docs/performance.md); unrolled
  seeds are S copies of the one-seed program in one call. On GPU and TPU, 'auto'
  takes vmap: one larger program to fill the chip.
  """
  if seed_axis not in stages.SEED_AXES:
    raise ConfigError(f"config.seed_axis={seed_axis!r} is unknown; use one of "
                     f"{', '.join(stages.SEED_AXES)}.")
  if seed_axis == "auto":
    return "unrolled" if jax.default_backend() == "cpu" else "vmap"
  return seed_axis


def over_seeds(fn, num_seeds: int, in_axes=0, seed_axis: str = "auto"):
  """`fn` mapped over a leading seed axis of S = `num_seeds`, as `jax.vmap(fn,
  in_axes)` computes it: by vmap, or (`seed_axis` 'unrolled') by calling `fn` once per
  seed on that seed's slice and stacking the outputs, all in one traced program.
  `in_axes`: 0 or None per positional argument (or one for all)."""
  how = resolve_seed_axis(seed_axis)
  if how == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    outs = [fn(*(a if ax is None else jax.tree.map(lambda x: x[s], a)
                 for a, ax in zip(args, axes))) for s in range(num_seeds)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return unrolled


def rolled_loop() -> bool:
  """Whether a call's K steps run in a `lax.scan` loop (GPU, TPU) or one after the
  other as straight-line code (CPU): XLA:CPU runs these steps 8-15x slower inside a
  loop, even a scan of length 1 or with unroll=True (measured on a 2-core x86-64 CPU,
  docs/performance.md)."""
  return jax.default_backend() != "cpu"


def train_steps(state: TrainState, inputs, teacher_variables=None, train_data=None, *,
                student: Network, teacher: Optional[Network] = None, distiller=None,
                use_labels: bool = True, num_seeds: int = 1, device_batch=None,
                seed_axis: str = "auto", rolled: Optional[bool] = None):
  """K training steps in one call (`lax.scan`), for one seed or several at once.

  With `num_seeds` > 1, every leaf of `state` has a leading seed axis and the seeds
  train side by side in the one program (`over_seeds`, by `seed_axis`): each its own
  weights and data, one shared frozen teacher. Each step computes what `train_step`
  computes.

  Args:
    state: a TrainState, `(S, ...)` leaves where there are S seeds.
    inputs: per step (leading axis K): the batches `{'image' (K, [S,] B, H, W, C),
      'label'}` (host pipeline) or, with `device_batch`, `{'indices' (K, [S,] B),
      'seed', 'step' (K, [S])}` from which the batches are gathered and augmented on
      the device.
    train_data: `(images uint8 (N, H, W, C), labels (N,))` on the device, with
      `device_batch`.
    device_batch: `data.device_train_batch` keyword arguments as a tuple of pairs, or
      None (host batches).
    rolled: the K steps in a `lax.scan` loop, or traced one after the other; None:
      `rolled_loop()`, by backend.

  Returns:
    `(state, metrics)`, each metric `(K, [S])`.
  """
  def one_step(st, x):
    if device_batch is not None:
      images, labels = train_data
      extras = {k: v for k, v in x.items() if k not in ("indices", "seed", "step")}
      x = data.device_train_batch(images, labels, x["indices"], x["seed"], x["step"],
                                  **dict(device_batch))
      x.update(extras)  # Per-example inputs gathered on the host (a teacher cache).
    return train_step(st, x, teacher_variables, student=student, teacher=teacher,
                      distiller=distiller, use_labels=use_labels)
  if num_seeds > 1:
    one_step = over_seeds(one_step, num_seeds, seed_axis=seed_axis)
  if rolled_loop() if rolled is None else rolled:  # Short compiles for long calls.
    return jax.lax.scan(one_step, state, inputs)
  num_steps = jax.tree.leaves(inputs)[0].shape[0]
  step_metrics = []
  for k in range(num_steps):
    state, m = one_step(state, jax.tree.map(lambda x: x[k], inputs))
    step_metrics.append(m)
  return state, jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)


def jit_train_steps(student: Network, teacher: Optional[Network] = None, distiller=None,
                    use_labels: bool = True, num_seeds: int = 1, device_batch=None,
                    seed_axis: str = "auto"):
  """`train_steps` as `(state, inputs, teacher_variables, train_data) -> (state,
  metrics)`, the state donated."""
  return _jit_train_steps(student, teacher, distiller, use_labels, num_seeds,
                          device_batch, resolve_seed_axis(seed_axis), rolled_loop())


@functools.lru_cache(maxsize=None)
def _jit_train_steps(student, teacher, distiller, use_labels, num_seeds, device_batch,
                     seed_axis, rolled):
  return jax.jit(functools.partial(
      train_steps, student=student, teacher=teacher, distiller=distiller,
      use_labels=use_labels, num_seeds=num_seeds, device_batch=device_batch,
      seed_axis=seed_axis, rolled=rolled), donate_argnums=0)


@functools.lru_cache(maxsize=None)
def jit_teacher_targets(teacher: Network, distiller):
  """`(teacher_variables, uint8 images) -> targets`: the teacher's share of a
  distillation step (for FSP, its matrices, `(B, m, n)` per pair)."""
  return jax.jit(functools.partial(teacher_targets, teacher, distiller=distiller))


@functools.lru_cache(maxsize=None)
def jit_predict(network: Network):
  """`(variables, uint8 images (B, H, W, C)) -> logits (B, K)`, inference mode."""
  return jax.jit(lambda variables, images: network.apply(variables, images)[0])


@functools.lru_cache(maxsize=None)
def _jit_eval_classify(network: Network):
  return jax.jit(functools.partial(eval_classify_step, network=network))


@functools.lru_cache(maxsize=None)
def _jit_eval_distill(network: Network, teacher: Network, distiller):
  return jax.jit(functools.partial(eval_distill_step, network=network, teacher=teacher,
                                   distiller=distiller))


def _accumulate(totals: Optional[Dict[str, np.ndarray]], batch_sums):
  """Adds one batch's sums (device arrays, scalars or per seed) into host totals."""
  batch_sums = jax.device_get(batch_sums)
  if totals is None:
    return {k: np.asarray(v, np.float64) for k, v in batch_sums.items()}
  return {k: totals[k] + np.asarray(v, np.float64) for k, v in batch_sums.items()}


def eval_seeds_step(variables, batch, *, network: Network, seed_axis: str = "auto"):
  """`eval_classify_step` of S seeds' variables `(S, ...)` at once: per-seed sums
  `(S,)` and `ensemble_correct`, the real examples the mean of the seeds' softmax
  outputs classifies correctly (the paper's ensemble)."""
  num_seeds = jax.tree.leaves(variables)[0].shape[0]
  logits = over_seeds(lambda v: network.apply(v, batch["image"])[0], num_seeds,
                      seed_axis=seed_axis)(variables)
  mask = batch["mask"]
  losses = jax.vmap(lambda l: optax.softmax_cross_entropy_with_integer_labels(
      l, batch["label"]))(logits)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  ensemble = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  ensemble_correct = (jnp.argmax(ensemble, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask, -1), "loss": jnp.sum(losses * mask, -1),
          "count": jnp.sum(mask), "ensemble_correct": jnp.sum(ensemble_correct * mask)}


@functools.lru_cache(maxsize=None)
def _jit_eval_seeds(network: Network, seed_axis: str):
  return jax.jit(functools.partial(eval_seeds_step, network=network,
                                   seed_axis=seed_axis))


@functools.lru_cache(maxsize=None)
def _jit_eval_distill_seeds(network: Network, teacher: Network, distiller,
                            num_seeds: int, seed_axis: str):
  return jax.jit(over_seeds(functools.partial(
      eval_distill_step, network=network, teacher=teacher, distiller=distiller),
      num_seeds, in_axes=(0, 0, None, None), seed_axis=seed_axis))


def _seed_results(seeds, values: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """Mean, std (ddof 1) and per-seed list of per-seed metrics `{name: (S,)}`."""
  out = {}
  for name, v in values.items():
    out[name] = float(np.mean(v))
    out[f"{name}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  out["per_seed"] = [{"seed": int(s), **{k: float(v[i]) for k, v in values.items()}}
                     for i, s in enumerate(seeds)]
  return out


def evaluate(exp: stages.Experiment, stage: stages.Stage, variables, distiller_params=None,
             teacher_variables=None, examples: int = 0) -> Dict[str, float]:
  """Test accuracy and loss, or for a stage 1 its objective: `test_<distiller>_loss`.

  `examples` > 0 (and below the test set's size) evaluates on that many test
  examples, a fixed random subset (the same in every call), and says so in the
  result (`test_examples`); 0 takes the whole test set. A stage of several seeds
  (`variables` with a leading seed axis) gives each metric's mean over seeds, its
  `_std`, a `per_seed` list and, for a classifier, `ensemble_test_accuracy`.
  """
  images, labels = data.test_split(exp.dataset, examples)
  bs = exp.config.eval_batch_size
  subset = ({"test_examples": len(labels)}
            if len(labels) < len(exp.dataset.test_labels) else {})
  network = exp.networks[stage.role]
  seeds = stages.stage_seeds(exp, stage)
  multi = len(seeds) > 1
  totals = None
  batches = data.eval_batches(images, labels, exp.mesh, bs)
  if stage.kind == "classify":
    step = (_jit_eval_seeds(network, exp.config.seed_axis) if multi
            else _jit_eval_classify(network))
    for batch in batches:
      totals = _accumulate(totals, step(variables, batch))
    if not multi:
      return {"test_accuracy": float(totals["correct"] / totals["count"]),
              "test_loss": float(totals["loss"] / totals["count"]), **subset}
    out = _seed_results(seeds, {"test_accuracy": totals["correct"] / totals["count"],
                                "test_loss": totals["loss"] / totals["count"]})
    out["ensemble_test_accuracy"] = float(totals["ensemble_correct"] / totals["count"])
    return {**out, **subset}
  distiller = exp.distiller(stage)
  teacher = exp.networks["teacher"]
  step = (_jit_eval_distill_seeds(network, teacher, distiller, len(seeds),
                                  exp.config.seed_axis) if multi
          else _jit_eval_distill(network, teacher, distiller))
  for batch in batches:
    totals = _accumulate(totals, step(variables, distiller_params or {},
                                      teacher_variables, batch))
  key = f"{distiller.name}_loss"
  if not multi:
    return {f"test_{key}": float(totals[key] / totals["count"]), **subset}
  count = np.asarray(totals["count"]).reshape(-1)[0]
  return {**_seed_results(seeds, {f"test_{key}": totals[key] / count}), **subset}


def predict(network: Network, variables, images: np.ndarray, mesh,
            batch_size: int = 500) -> np.ndarray:
  """Logits `(N, K)` of uint8 `images` `(N, H, W, C)`, inference mode."""
  fn = jit_predict(network)
  out = [np.asarray(jax.device_get(fn(variables, batch["image"])))
         for batch in data.eval_batches(images, np.zeros(len(images), np.int32), mesh,
                                        batch_size)]
  return np.concatenate(out)[:len(images)]


def teacher_target_cache(exp: stages.Experiment, stage: stages.Stage, distiller,
                         teacher_variables):
  """`{'teacher_targets': ...}`: the frozen teacher's FSP matrices of every training
  example (host float32, one `(N, m, n)` array per pair), gathered into each batch by
  the input pipeline; None unless `config.fsp.cache_teacher` and `stage` is FSP's.

  The teacher is in inference mode, so an example's matrices depend on the example
  only, never on the rest of its batch: with un-augmented inputs they are the same
  every epoch, and computing them once gives the loss that recomputing gives.
  """
  if stage.kind != "fsp" or not exp.config.fsp.cache_teacher:
    return None
  ds, bs = exp.dataset, exp.config.eval_batch_size
  stages.check_teacher_cache(exp, [stage])
  nbytes = stages.teacher_cache_bytes(exp, stage)
  targets = jit_teacher_targets(exp.networks["teacher"], distiller)
  t0 = time.time()
  cache = data.map_examples(lambda images: targets(teacher_variables, images),
                            ds.train_images, exp.mesh, bs)
  log.info("[%s] cached the teacher's FSP matrices of %d training examples "
           "(%.2f GiB on the host) in %.0f s.", stage.name, len(ds.train_labels),
           nbytes / 2**30, time.time() - t0)
  return {"teacher_targets": cache}


def _sync(name: str) -> None:
  """Waits for every process (a no-op with one), e.g. after process 0 wrote a file."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _last_step_metrics(step_metrics, one_step: bool, num_seeds: int) -> Dict[str, Any]:
  """Host floats of the last step of a call: its metrics (their mean over seeds, and
  with several seeds `<name>_per_seed` lists too)."""
  m = jax.device_get(step_metrics)
  if not one_step:
    m = {k: np.asarray(v)[-1] for k, v in m.items()}
  out = {k: float(np.mean(v)) for k, v in m.items()}
  if num_seeds > 1:
    out.update({f"{k}_per_seed": [float(x) for x in np.asarray(v)] for k, v in m.items()})
  return out


def train_and_evaluate(exp: stages.Experiment, stage: stages.Stage,
                       preemption: Optional[guards.PreemptionWatch] = None
                       ) -> Dict[str, Any]:
  """Trains one stage (resuming from its last checkpoint) and evaluates it.

  Returns the stage's results: kind, model, steps, wall time and the final test
  metrics (`evaluate`). Raises `guards.Preempted` after saving where `preemption`
  says so, FloatingPointError where the loss or weights stop being finite.
  """
  cfg, sched = exp.config, stage.schedule
  stage_dir = exp.stage_dir(stage.name)
  # stage.json first: no checkpoint exists without the fingerprint of its experiment.
  if jax.process_index() == 0:
    checkpoints.write_stage_info(stage_dir, {
        "fingerprint": stages.fingerprint(cfg, stage, list(exp.stages))})
  _sync(f"stage.json {stage.name}")

  network = exp.networks[stage.role]
  distiller = exp.distiller(stage)
  teacher = exp.networks["teacher"] if distiller is not None else None
  teacher_variables = stages.teacher_variables(exp) if distiller is not None else None
  cache = teacher_target_cache(exp, stage, distiller, teacher_variables)
  variables = stages.initial_variables(exp, stage)
  if stage.init_from:
    log.info("[%s] starts from the final weights of stage %r.", stage.name,
             stage.init_from)
  elif stage.name == "teacher" and cfg.teacher.pretrained:
    log.info("[%s] fine-tunes the weights of %s.", stage.name, cfg.teacher.pretrained)
  lr_fn = create_learning_rate_fn(sched.learning_rates, sched.boundaries,
                                  sched.warmup_steps)
  tx = create_optimizer(lr_fn, sched.momentum, sched.weight_decay)
  distiller_params = stages.initial_distiller_params(exp, stage, distiller)
  seeds = stages.stage_seeds(exp, stage)
  create = lambda v, d: create_train_state(network, v, tx, d)  # noqa: E731
  state = jax.jit(create if len(seeds) == 1 else over_seeds(
      create, len(seeds), seed_axis=cfg.seed_axis),
                  out_shardings=exp.replicated)(variables, distiller_params)

  mngr = checkpoints.manager(stage_dir, cfg.max_checkpoints_to_keep)
  # The newest intact checkpoint (one that cannot be read is moved aside).
  state, meta, start = checkpoints.restore_latest(mngr, state, stage.name)
  # Wall time of the steps the restored checkpoint holds; steps redone after a kill
  # are not counted twice.
  wall_before = 0.0
  if start:
    wall_before = float(meta.get("wall_time_s", 0.0))
    log.info("[%s] resumes from its checkpoint at step %d.", stage.name, start)
  total = sched.num_steps
  writer = metrics.MetricsWriter(stage_dir, start, kind=stage.kind, final_step=total)
  step_teacher = None if cache is not None else teacher_variables
  guard = guards.NonFiniteGuard(stage.name, f"{stage.schedule_field}.learning_rates",
                                stage_dir, exp.replicated)
  eval_every = cfg.eval_every if sched.eval_every < 0 else sched.eval_every
  pipeline = stages.input_pipeline(cfg, stage)
  log.info("[%s] %s of %s (%s), steps %d..%d, batch %d%s.", stage.name, stage.kind,
           cfg[stage.role].model, stage.role, start, total, sched.batch_size,
           f", seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else "")
  t_stage = time.time()
  progress = metrics.Progress(stage.name, start, total, sched.batch_size * len(seeds))
  last_saved = start

  def save(step):
    guard.check(mngr, step, state.variables)
    checkpoints.save(mngr, step, state,
                     {"wall_time_s": wall_before + time.time() - t_stage})

  try:
    use_labels = stage.kind == "classify"
    if pipeline == "host" and cfg.steps_per_call == 1 and len(seeds) == 1:
      # One step per call from the host pipeline: `train_step` itself.
      step_fn = jit_train_step(network, teacher, distiller, use_labels)
      calls = ((step, step + 1, batch) for step, batch in data.train_batches(
          exp.dataset, exp.mesh, sched.batch_size, cfg.seed, start, total,
          augment=sched.augment, pad=cfg.data.pad, flip=cfg.data.flip, extras=cache))
      run_call = lambda state, inputs: step_fn(state, inputs, step_teacher)  # noqa: E731
    else:
      device_batch = None
      train_data = None
      if pipeline == "device":
        # The training set sharded over the mesh by examples, batches gathered from it.
        device_batch = (("augment", bool(sched.augment)), ("pad", int(cfg.data.pad)),
                        ("flip", bool(cfg.data.flip)),
                        ("crop_size", tuple(exp.dataset.crop_size or ())),
                        ("mesh", exp.mesh))
        train_data = data.device_train_data(exp.dataset, exp.mesh)
      steps_fn = jit_train_steps(network, teacher, distiller, use_labels, len(seeds),
                                 device_batch, cfg.seed_axis)
      calls = data.train_calls(
          exp.dataset, exp.mesh, sched.batch_size, seeds,
          data.call_ranges(start, total, cfg.steps_per_call,
                           (cfg.log_every, eval_every, cfg.checkpoint_every)),
          device=pipeline == "device", augment=sched.augment, pad=cfg.data.pad,
          flip=cfg.data.flip, extras=cache)
      run_call = lambda state, inputs: steps_fn(  # noqa: E731
          state, inputs, step_teacher, train_data)
    for lo, done, inputs in calls:
      state, step_metrics = run_call(state, inputs)
      guard.track(step_metrics["loss"], done, lo + 1)
      preempted = preemption is not None and preemption.reached()
      if done % cfg.log_every == 0 or done == total:
        guard.check(mngr, done)
        record = _last_step_metrics(step_metrics, one_step=done - lo == 1 and
                                    pipeline == "host" and cfg.steps_per_call == 1
                                    and len(seeds) == 1, num_seeds=len(seeds))
        images_per_s = progress.update(done, record["loss"])
        writer.write({"step": done, "learning_rate": float(lr_fn(done - 1)),
                      "images_per_s": images_per_s, **record})
      if eval_every and done % eval_every == 0 and done != total:
        writer.write({"step": done, **evaluate(
            exp, stage, state.variables, state.distiller_params, teacher_variables,
            examples=cfg.eval_examples)})
      if done % cfg.checkpoint_every == 0 or done == total or preempted:
        save(done)
        last_saved = done
      if preempted:
        mngr.wait_until_finished()
        raise guards.Preempted(f"[{stage.name}] SIGTERM: checkpoint at step {done} "
                               "saved.")
    if last_saved != total:  # e.g. resumed at the final step.
      save(total)
    mngr.wait_until_finished()
  finally:
    progress.close()
    mngr.close()  # Waits for a save in flight: the last good checkpoint completes.
  final = evaluate(exp, stage, state.variables, state.distiller_params, teacher_variables)
  wall = wall_before + time.time() - t_stage
  writer.write({"step": total, **final})
  writer.close()
  result = {"kind": stage.kind, "model": cfg[stage.role].model, "steps": total,
            "wall_time_s": round(wall, 1), **final}
  log.info("[%s] done: %s", stage.name, metrics.summary(result))
  return result


def run(config, workdir: str, wait_for_workdir: bool = False) -> Dict[str, Any]:
  """Runs (or resumes) every stage of `config` in `workdir`; returns results.json.

  Stages already in `WORKDIR/results.json` are skipped where their final checkpoint
  can be read (else they run again from their newest intact one); an interrupted one
  resumes from its last checkpoint. The workdir is held for the run
  (`fsp_jax.workdir`): another run on it raises WorkdirBusy, or, with
  `wait_for_workdir`, is waited for.
  """
  exp = stages.setup(config, workdir)
  with workdir_lib.hold(exp.workdir, wait=wait_for_workdir) as lock:
    if lock.waited:  # The run waited for may have written the workdir meanwhile.
      stages.check_workdir(exp)
    results = metrics.read_results(exp.workdir)
    with guards.PreemptionWatch() as preemption:
      for stage in exp.stages:
        if (stage.name in results and os.path.isdir(exp.stage_dir(stage.name))
            and checkpoints.final_intact(exp.stage_dir(stage.name),
                                         stage.schedule.num_steps, stage.name)):
          log.info("[%s] finished earlier (%s); skipping.", stage.name,
                   metrics.summary(results[stage.name]))
          continue
        results[stage.name] = train_and_evaluate(exp, stage, preemption)
        if jax.process_index() == 0:
          metrics.write_results(exp.workdir, results)
        _sync(f"results {stage.name}")
        if preemption.signalled and stage is not exp.stages[-1]:
          raise guards.Preempted(f"[{stage.name}] SIGTERM: stage finished and saved.")
  return results
