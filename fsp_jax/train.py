"""Training and evaluation steps: small pure functions, jit-compiled by the caller.

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
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from fsp_jax import distillers as distillers_lib
from fsp_jax import fsp


class TrainState(train_state.TrainState):
  """Optimizer state, BatchNorm running statistics and a distiller's own parameters.

  `distiller_params` (a FitNet regressor, FSP adapters; `{}` for most stages) are
  trained by the same optimizer as `params` but are not part of the model: `variables`
  is the model alone, what the next stage restores.
  """
  batch_stats: Any = None
  distiller_params: Any = struct.field(default_factory=dict)

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def trainable(self):
    """What the optimizer updates: `params`, or `{'model', 'distiller'}` params."""
    if not self.distiller_params:
      return self.params
    return {"model": self.params, "distiller": self.distiller_params}

  def split(self, trainable):
    """Inverse of `trainable`: `(params, distiller_params)`."""
    if not self.distiller_params:
      return trainable, self.distiller_params
    return trainable["model"], trainable["distiller"]

  @classmethod
  def create(cls, *, apply_fn, params, tx, distiller_params=None, **kwargs):
    distiller_params = distiller_params or {}
    trainable = ({"model": params, "distiller": distiller_params} if distiller_params
                 else params)
    return cls(step=0, apply_fn=apply_fn, params=params, tx=tx,
               opt_state=tx.init(trainable), distiller_params=distiller_params, **kwargs)

  def apply_gradients(self, *, grads, **kwargs):
    """`grads` has the structure of `trainable`."""
    if not self.distiller_params:
      return super().apply_gradients(grads=grads, **kwargs)
    updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
    params, distiller_params = self.split(optax.apply_updates(self.trainable, updates))
    return self.replace(step=self.step + 1, params=params,
                        distiller_params=distiller_params, opt_state=opt_state, **kwargs)


def create_learning_rate_fn(learning_rates: Sequence[float],
                            boundaries: Sequence[int]) -> Callable[[jax.Array], jax.Array]:
  """Piecewise-constant learning rate in iterations, as the paper states schedules.

  `learning_rates[k]` holds for `boundaries[k-1] <= step < boundaries[k]`; e.g.
  (0.1, 0.01, 0.001) with boundaries (32000, 48000).
  """
  if len(learning_rates) != len(boundaries) + 1:
    raise ValueError(f"{len(learning_rates)} learning rates need {len(learning_rates) - 1} "
                     f"boundaries; got {len(boundaries)}.")
  values = jnp.asarray(learning_rates, jnp.float32)
  bounds = jnp.asarray(boundaries, jnp.int32)

  def schedule(step):
    return values[jnp.sum(step >= bounds)]
  return schedule


def create_optimizer(learning_rate_fn, momentum: float, weight_decay: float,
                     nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (PyTorch's SGD)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate_fn, momentum=momentum, nesterov=nesterov))


def init_variables(model: nn.Module, rng: jax.Array, image_shape) -> Dict[str, Any]:
  """Initial `{'params', 'batch_stats'}` of `model` for images `(H, W, C)`."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def create_train_state(model: nn.Module, variables, tx,
                       distiller_params=None) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx,
                           distiller_params=distiller_params)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 `(B, H, W, C)` -> float32 standardised per channel (mean, std `(C,)`)."""
  return (images.astype(jnp.float32) - mean) / std


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; logits `(B, K)`, integer labels `(B,)`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def teacher_targets(teacher_apply, teacher_variables, images, distiller):
  """What `distiller` takes from the frozen teacher (BN in inference mode), no
  gradient."""
  logits, features = teacher_apply(teacher_variables, images, train=False)
  return jax.lax.stop_gradient(distiller.teacher_targets(logits, features))


def train_step(state: TrainState, teacher_variables, batch, mean, std, *,
               teacher_apply=None, distiller=None, use_labels: bool = True,
               targets=None):
  """One SGD step of every kind of stage. Returns the new state and metrics.

  Loss = cross-entropy on labels (where `use_labels`) + the batch mean of
  `distiller.objective` (where a distiller is given). Only the student (`state`) and
  the distiller's own parameters are differentiated; the teacher's variables are an
  input. Where `targets` (the teacher's, cached) are given, the teacher forward pass is
  skipped.

  Args:
    state: the student's TrainState.
    teacher_variables: the frozen teacher's `{'params', 'batch_stats'}`, or None.
    batch: `{'image': uint8 (B, H, W, C), 'label': int32 (B,)}`.
    mean, std: `(C,)` per-channel normalisation.
    teacher_apply: the teacher model's `apply`.
    distiller: a `fsp_jax.distillers` method, or None for plain classification.
    use_labels: add the main-task cross-entropy (False for stage 1).

  Returns:
    `(state, metrics)`; metrics hold `loss` (the total), `accuracy` where labels are
    used, and each term (`task_loss`, `<distiller>_loss`) where there are two.
  """
  if not use_labels and distiller is None:
    raise ValueError("a step with neither labels nor a distiller has no loss.")
  images = normalize(batch["image"], mean, std)
  if distiller is not None and targets is None:
    targets = teacher_targets(teacher_apply, teacher_variables, images, distiller)

  def loss_fn(trainable):
    params, distiller_params = state.split(trainable)
    (logits, features), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    terms = {}
    if use_labels:
      terms["task_loss"] = cross_entropy_loss(logits, batch["label"])
    if distiller is not None:
      terms[f"{distiller.name}_loss"] = jnp.mean(distiller.objective(
          distiller_params, targets, logits, features, state.step))
    # A single term is the loss itself (no `0 +`): the plain classification and FSP
    # steps compute exactly what they did before distillers were pluggable.
    loss = functools.reduce(operator.add, terms.values())
    return loss, (logits, updates["batch_stats"], terms)

  (loss, (logits, batch_stats, terms)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.trainable)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": loss}
  if use_labels:
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  if len(terms) > 1:
    metrics.update(terms)
  return state, metrics


def classify_step(state: TrainState, batch, mean, std):
  """One SGD step on softmax cross-entropy. Returns the new state and metrics."""
  return train_step(state, None, batch, mean, std)


def teacher_fsp_matrices(teacher_apply, teacher_variables, images, fsp_pairs, pool):
  """The frozen teacher's FSP matrices (BN in inference mode), one `(B, m, n)` per pair."""
  _, features = teacher_apply(teacher_variables, images, train=False)
  return jax.lax.stop_gradient(fsp.fsp_matrices(features, fsp_pairs, pool))


def fsp_step(state: TrainState, teacher_variables, batch, mean, std, *, teacher_apply,
             fsp_pairs, fsp_weights, pool, teacher_matrices=None):
  """Stage 1: one SGD step of the student on the FSP loss (Eq. 2) only.

  `train_step` with the `distillers.FSP` objective and no labels. Where
  `teacher_matrices` are given (cached), the teacher forward pass is skipped.
  """
  distiller = distillers_lib.FSP(tuple(fsp_pairs or ()),
                                 tuple(fsp_weights) if fsp_weights else None, pool)
  return train_step(state, teacher_variables, batch, mean, std,
                    teacher_apply=teacher_apply, distiller=distiller, use_labels=False,
                    targets=teacher_matrices)


# The jitted steps, built here so that the pipeline and the benchmark (`fsp_jax.bench`)
# run the very same compiled functions. The state is donated: XLA updates parameters
# and optimizer state in place instead of copying them every step.
def jit_train_step(teacher_apply=None, distiller=None, use_labels: bool = True,
                   cached_targets: bool = False):
  """`train_step` as `(state, teacher_variables, batch, mean, std) -> (state, metrics)`.

  With `cached_targets`, the teacher's targets (e.g. its FSP matrices, computed once per
  example) come in `batch['teacher_targets']` and the teacher is not run
  (`teacher_variables` may be None).
  """
  def step(state, teacher_variables, batch, mean, std):
    targets = batch["teacher_targets"] if cached_targets else None
    return train_step(state, teacher_variables, batch, mean, std,
                      teacher_apply=teacher_apply, distiller=distiller,
                      use_labels=use_labels, targets=targets)
  return jax.jit(step, donate_argnums=0)


def jit_teacher_targets(teacher_apply, distiller):
  """`(teacher_variables, images uint8, mean, std) -> targets`, the teacher's share of a
  distillation step: its forward pass in inference mode and what `distiller` takes from
  it (for FSP, its matrices, `(B, m, n)` per pair)."""
  def fn(teacher_variables, images, mean, std):
    return teacher_targets(teacher_apply, teacher_variables, normalize(images, mean, std),
                           distiller)
  return jax.jit(fn)


def eval_classify_step(apply_fn, variables, batch, mean, std, with_logits=False):
  """Sums over the real (mask 1) examples: correct predictions, loss, count; with
  `with_logits`, also the batch's `logits` `(B, K)` (padding rows included)."""
  images = normalize(batch["image"], mean, std)
  logits, _ = apply_fn(variables, images, train=False)
  mask = batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  out = {"correct": jnp.sum(correct * mask), "loss": jnp.sum(losses * mask),
         "count": jnp.sum(mask)}
  if with_logits:
    out["logits"] = logits
  return out


def eval_distill_step(apply_fn, variables, distiller_params, teacher_variables, batch,
                      mean, std, *, teacher_apply, distiller):
  """Sum over real (mask 1) examples of the distiller's objective (student in
  inference mode): `{'<distiller>_loss', 'count'}`."""
  images = normalize(batch["image"], mean, std)
  logits, features = apply_fn(variables, images, train=False)
  targets = teacher_targets(teacher_apply, teacher_variables, images, distiller)
  per_example = distiller.objective(distiller_params, targets, logits, features, 0)
  mask = batch["mask"]
  return {f"{distiller.name}_loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}


def accumulate(totals: Optional[Dict[str, np.ndarray]], batch_sums) -> Dict[str, np.ndarray]:
  """Adds one batch's sums (device arrays) into running host totals."""
  batch_sums = jax.device_get(batch_sums)
  if totals is None:
    return {k: np.float64(v) for k, v in batch_sums.items()}
  return {k: totals[k] + np.float64(v) for k, v in batch_sums.items()}


def track_nonfinite(first_bad: Tuple[jax.Array, jax.Array], loss: jax.Array,
                    step) -> Tuple[jax.Array, jax.Array]:
  """`(step, loss)` of the first non-finite loss seen so far; step is -1 while none.

  Runs on the device after every training step, so the host learns the exact step of a
  NaN or inf without waiting for each step's loss (which would stall dispatch).
  """
  bad_step, bad_loss = first_bad
  new = (bad_step < 0) & ~jnp.isfinite(loss)
  return jnp.where(new, step, bad_step), jnp.where(new, loss, bad_loss)


def all_finite(tree) -> jax.Array:
  """True where every array of `tree` (e.g. params and batch_stats) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
