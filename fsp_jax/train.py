"""Training and evaluation: the steps, the loop of one stage, and a whole experiment.

One step, `train_step`, serves every stage (the paper's Algorithm 1 and the baselines):
- main task: softmax cross-entropy on labels (teacher, stage 2, scratch baselines),
  optionally plus a method's term (e.g. Hinton KD);
- stage 1: a method's objective only (e.g. FSP's Eq. 2), no labels.
The objective (`fsp_jax.methods`) is a parameter: the step does not know which
method it runs. The teacher is frozen (an input, never differentiated; BN in inference
mode).

Data parallelism is `jax.jit` over a `Mesh` with the batch sharded along 'data' and the
state replicated: XLA inserts the gradient all-reduce and computes BatchNorm statistics
over the global batch (no `axis_name`, no pmap).

`train_and_evaluate(stage)` trains and evaluates one stage (a `stages.StageSetup`,
resolved once from the config by `stages.resolve`), resuming from its last
checkpoint; `run(config, workdir)` runs (or resumes) every stage of a config. The
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

from fsp_jax import checkpoints, data, guards, methods, metrics, stages
from fsp_jax.optim import create_learning_rate_fn, create_optimizer  # noqa: F401
from fsp_jax import validation
from fsp_jax import workdir as workdir_lib
from fsp_jax.models import Network

log = logging.getLogger("fsp_jax")


class TrainState(train_state.TrainState):
  """Optimizer state and BatchNorm running statistics of a stage.

  `params` is always `{'student': ..., 'distiller': ...}`: the trained network's
  parameters and its stage's objective's own (a regressor, channel adapters; `{}`
  for most stages), trained by one optimizer. `variables` is the network alone, what
  the next stage restores. (The stage's network is the student's, or the teacher's
  for the teacher stage and the `teacher_short` baseline.) `objective_state` is a
  stateful objective's state (CRD's memory bank; `{}` for the others), updated by
  the objective itself, never by the optimizer.
  """
  batch_stats: Any = None
  objective_state: Any = None

  @property
  def variables(self) -> Dict[str, Any]:
    return {"params": self.params["student"], "batch_stats": self.batch_stats}

  @property
  def distiller_params(self):
    return self.params["distiller"]


def create_train_state(network: Network, variables, tx, distiller_params=None,
                       objective_state=None) -> TrainState:
  """`network`'s train state. It holds no `apply_fn` (the steps are given the
  network): a bound method compares by identity, so the state's structure, and with
  it the traced step, would differ for every new but equal network."""
  del network
  params = {"student": variables["params"], "distiller": distiller_params or {}}
  return TrainState.create(apply_fn=None, params=params, tx=tx,
                           batch_stats=variables["batch_stats"],
                           objective_state=objective_state or {})


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
  an input, and its BatchNorm runs in inference mode (its statistics do not move). A
  stateful distiller's new state (CRD's memory bank) replaces `state.objective_state`;
  one that does not train the student (FT's stage 1) runs no student forward pass.

  Args:
    state: the stage's TrainState.
    batch: `{'image': uint8 (B, H, W, C), 'label': int32 (B,)}`; with
      `'teacher_targets'` (the teacher's, cached per example) the teacher is not run;
      `'index'` `(B,)` int32, the examples' rows, where the distiller reads them.
    teacher_variables: the frozen teacher's `{'params', 'batch_stats'}`, or None.
    student: the network `state` trains.
    teacher: the teacher's network (where a distiller reads it).
    distiller: a `fsp_jax.methods` objective, or None for plain classification.
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

  runs_student = distiller is None or distiller.trains_student

  def loss_fn(params):
    logits, features, batch_stats = None, None, state.batch_stats
    if runs_student:
      (logits, features), batch_stats = student.apply(
          {"params": params["student"], "batch_stats": state.batch_stats}, images,
          train=True)
    terms, objective_state = {}, state.objective_state
    if use_labels:
      terms["task_loss"] = cross_entropy_loss(logits, batch["label"])
    if distiller is not None:
      per_example, objective_state = methods.call(
          distiller, params["distiller"], targets, logits, features, state.step,
          labels=batch.get("label"), index=batch.get("index"),
          state=state.objective_state)
      terms[f"{distiller.name}_loss"] = jnp.mean(per_example)
    # A single term is the loss itself (no `0 +`).
    loss = functools.reduce(operator.add, terms.values())
    return loss, (logits, batch_stats, terms, objective_state)

  (loss, (logits, batch_stats, terms, objective_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                objective_state=jax.lax.stop_gradient(objective_state))
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
  logits, features = None, None
  if distiller.trains_student:
    logits, features = network.apply(variables, batch["image"])
  targets = teacher_targets(teacher, teacher_variables, batch["image"], distiller)
  per_example, _ = methods.call(distiller, distiller_params, targets, logits, features,
                                0, labels=batch["label"])
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
  validation.check_choice(seed_axis, validation.SEED_AXES, "seed_axis")
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
    device_batch: `(augment, mesh)`, the `data.Augment` and mesh with which
      `data.device_train_batch` gathers each batch (`stages.Feed.device_batch`), or
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
      augment, mesh = device_batch
      x = data.device_train_batch(images, labels, x["indices"], x["seed"], x["step"],
                                  augment, mesh=mesh)
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


def evaluate(stage: stages.StageSetup, variables, distiller_params=None,
             teacher_variables=None, examples: int = 0) -> Dict[str, float]:
  """Test accuracy and loss, or for a stage 1 its objective: `test_<objective>_loss`.

  `examples` > 0 (and below the test set's size) evaluates on that many test
  examples, a fixed random subset (the same in every call), and says so in the
  result (`test_examples`); 0 takes the whole test set. A stage of several seeds
  (`variables` with a leading seed axis) gives each metric's mean over seeds, its
  `_std`, a `per_seed` list and, for a classifier, `ensemble_test_accuracy`.
  """
  images, labels = data.test_split(stage.dataset, examples)
  subset = ({"test_examples": len(labels)}
            if len(labels) < len(stage.dataset.test_labels) else {})
  network, seeds = stage.network, stage.seeds
  multi = len(seeds) > 1
  totals = None
  batches = data.eval_batches(images, labels, stage.mesh, stage.eval_batch_size)
  if stage.use_labels:
    step = (_jit_eval_seeds(network, stage.seed_axis) if multi
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
  objective = stage.objective
  step = (_jit_eval_distill_seeds(network, stage.teacher, objective, len(seeds),
                                  stage.seed_axis) if multi
          else _jit_eval_distill(network, stage.teacher, objective))
  for batch in batches:
    totals = _accumulate(totals, step(variables, distiller_params or {},
                                      teacher_variables, batch))
  key = f"{objective.name}_loss"
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


def teacher_target_cache(stage: stages.StageSetup, teacher_variables):
  """`{'teacher_targets': ...}`: what the stage's objective takes from the frozen
  teacher for every training example (host float32 arrays `(N, ...)`, e.g. one
  `(N, m, n)` per FSP pair), gathered into each batch by the input pipeline; None
  unless the stage caches the teacher (`config.<method>.cache_teacher`).

  The teacher is in inference mode, so an example's targets depend on the example
  only, never on the rest of its batch: with un-augmented inputs they are the same
  every epoch, and computing them once gives the loss that recomputing gives.
  """
  if not stage.caches_teacher:
    return None
  stage.check_teacher_cache()
  targets = jit_teacher_targets(stage.teacher, stage.objective)
  t0 = time.time()
  cache = data.map_examples(lambda images: targets(teacher_variables, images),
                            stage.dataset.train_images, stage.mesh,
                            stage.eval_batch_size)
  nbytes = sum(a.nbytes for a in jax.tree.leaves(cache))
  log.info("[%s] cached the teacher's targets of %d training examples (%.2f GiB on "
           "the host) in %.0f s.", stage.name, len(stage.dataset.train_labels),
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


def example_extras(stage: stages.StageSetup, cache=None):
  """Per-example arrays the stage's batches carry besides images and labels: the
  teacher-target `cache` (or None), and each example's row (`index`, int32 `(N,)`)
  where the objective reads it (CRD's memory bank). None where there are none."""
  if stage.objective is None or not stage.objective.reads_index:
    return cache
  return {**(cache or {}),
          "index": np.arange(len(stage.dataset.train_labels), dtype=np.int32)}


def initial_state(stage: stages.StageSetup) -> TrainState:
  """The stage's TrainState before its first step (seeds stacked on a leading axis),
  from where its weights start, replicated over the devices."""
  create = lambda v, d, o: create_train_state(  # noqa: E731
      stage.network, v, stage.optimizer, d, o)
  if len(stage.seeds) > 1:
    create = over_seeds(create, len(stage.seeds), seed_axis=stage.seed_axis)
  return jax.jit(create, out_shardings=stage.replicated)(
      stage.initial_variables(), stage.initial_objective_params(),
      stage.initial_objective_state())


def step_call(stage: stages.StageSetup, teacher_variables=None):
  """`(state, inputs) -> (state, metrics)`: one call of the stage's jitted training,
  one step (`jit_train_step`) or K steps and several seeds (`jit_train_steps`),
  on what `stage.feed.calls` yields; `teacher_variables` where the step runs the
  teacher (None where its targets come cached in the inputs)."""
  feed = stage.feed
  if feed.one_step:
    step_fn = jit_train_step(stage.network, stage.teacher, stage.objective,
                             stage.use_labels)
    return lambda state, inputs: step_fn(state, inputs, teacher_variables)
  steps_fn = jit_train_steps(stage.network, stage.teacher, stage.objective,
                             stage.use_labels, len(stage.seeds), feed.device_batch,
                             stage.seed_axis)
  train_data = feed.train_data()
  return lambda state, inputs: steps_fn(state, inputs, teacher_variables, train_data)


def train_and_evaluate(stage: stages.StageSetup,
                       preemption: Optional[guards.PreemptionWatch] = None
                       ) -> Dict[str, Any]:
  """Trains one stage (resuming from its last checkpoint) and evaluates it.

  Returns the stage's results: kind, model, steps, wall time and the final test
  metrics (`evaluate`). Raises `guards.Preempted` after saving where `preemption`
  says so, FloatingPointError where the loss or weights stop being finite.
  """
  # The stage's folder: stage.json first, so that no checkpoint exists without the
  # fingerprint of its experiment.
  if jax.process_index() == 0:
    checkpoints.write_stage_info(stage.folder, {"fingerprint": stage.fingerprint})
  _sync(f"stage.json {stage.name}")

  # The frozen teacher (where the objective reads it) and the initial state.
  teacher_variables = stage.teacher_variables() if stage.teacher_variables else None
  cache = teacher_target_cache(stage, teacher_variables)
  extras = example_extras(stage, cache)
  if stage.start:
    log.info("[%s] %s.", stage.name, stage.start)
  state = initial_state(stage)

  # Restore: the newest intact checkpoint (one that cannot be read is moved aside).
  mngr = checkpoints.manager(stage.folder, stage.max_checkpoints_to_keep)
  state, meta, start = checkpoints.restore_latest(mngr, state, stage.name)
  # Wall time of the steps the restored checkpoint holds; steps redone after a kill
  # are not counted twice.
  wall_before = float(meta.get("wall_time_s", 0.0)) if start else 0.0
  if start:
    log.info("[%s] resumes from its checkpoint at step %d.", stage.name, start)

  # The step: one `train_step` per call, or K steps (and several seeds) per call.
  feed, total = stage.feed, stage.schedule.num_steps
  run_call = step_call(stage, None if cache is not None else teacher_variables)

  writer = metrics.MetricsWriter(stage.folder, start, kind=stage.kind, final_step=total)
  guard = guards.NonFiniteGuard(stage.name, stage.learning_rates_field, stage.folder,
                                stage.replicated)
  log.info("[%s] %s of %s (%s), steps %d..%d, batch %d%s.", stage.name, stage.kind,
           stage.model, stage.role, start, total, feed.batch_size,
           f", seeds {stage.seeds[0]}..{stage.seeds[-1]}" if len(stage.seeds) > 1
           else "")
  t_stage = time.time()
  progress = metrics.Progress(stage.name, start, total,
                              feed.batch_size * len(stage.seeds))
  last_saved = start

  def save(step):
    guard.check(mngr, step, state.variables)
    checkpoints.save(mngr, step, state,
                     {"wall_time_s": wall_before + time.time() - t_stage})

  # The loop: train, log, evaluate, save; a SIGTERM saves and stops.
  try:
    for lo, done, inputs in feed.calls(start, total, extras=extras):
      state, step_metrics = run_call(state, inputs)
      guard.track(step_metrics["loss"], done, lo + 1)
      preempted = preemption is not None and preemption.reached()
      if done % stage.log_every == 0 or done == total:
        guard.check(mngr, done)
        record = _last_step_metrics(step_metrics, one_step=feed.one_step,
                                    num_seeds=len(stage.seeds))
        images_per_s = progress.update(done, record["loss"])
        writer.write({"step": done, "learning_rate": float(stage.learning_rate_fn(
            done - 1)), "images_per_s": images_per_s, **record})
      if stage.eval_every and done % stage.eval_every == 0 and done != total:
        writer.write({"step": done, **evaluate(
            stage, state.variables, state.distiller_params, teacher_variables,
            examples=stage.eval_examples)})
      if done % stage.checkpoint_every == 0 or done == total or preempted:
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

  # The final evaluation, on the whole test set.
  final = evaluate(stage, state.variables, state.distiller_params, teacher_variables)
  wall = wall_before + time.time() - t_stage
  writer.write({"step": total, **final})
  writer.close()
  result = {"kind": stage.kind, "model": stage.model, "steps": total,
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
        results[stage.name] = train_and_evaluate(stages.resolve(exp, stage), preemption)
        if jax.process_index() == 0:
          metrics.write_results(exp.workdir, results)
        _sync(f"results {stage.name}")
        if preemption.signalled and stage is not exp.stages[-1]:
          raise guards.Preempted(f"[{stage.name}] SIGTERM: stage finished and saved.")
  return results
