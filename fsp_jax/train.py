"""Training and evaluation steps: small pure functions, jit-compiled by the caller.

Stages (the paper's Algorithm 1):
- `classify`: softmax cross-entropy on labels (teacher, stage 2, scratch baselines).
- `fsp`: stage 1, the FSP loss of Eq. 2 only; the teacher is frozen, BN in inference
  mode; no labels are used.

Data parallelism is `jax.jit` over a `Mesh` with the batch sharded along 'data' and the
state replicated: XLA inserts the gradient all-reduce and computes BatchNorm statistics
over the global batch (no `axis_name`, no pmap).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fsp_jax import fsp


class TrainState(train_state.TrainState):
  """Optimizer state plus BatchNorm running statistics."""
  batch_stats: Any = None

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


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


def create_train_state(model: nn.Module, variables, tx) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 `(B, H, W, C)` -> float32 standardised per channel (mean, std `(C,)`)."""
  return (images.astype(jnp.float32) - mean) / std


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; logits `(B, K)`, integer labels `(B,)`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classify_step(state: TrainState, batch, mean, std):
  """One SGD step on softmax cross-entropy. Returns the new state and metrics."""
  images = normalize(batch["image"], mean, std)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = cross_entropy_loss(logits, batch["label"])
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, {"loss": loss, "accuracy": accuracy}


def teacher_fsp_matrices(teacher_apply, teacher_variables, images, fsp_pairs, pool):
  """The frozen teacher's FSP matrices (BN in inference mode), one `(B, m, n)` per pair."""
  _, features = teacher_apply(teacher_variables, images, train=False)
  return jax.lax.stop_gradient(fsp.fsp_matrices(features, fsp_pairs, pool))


def fsp_step(state: TrainState, teacher_variables, batch, mean, std, *, teacher_apply,
             fsp_pairs, fsp_weights, pool, teacher_matrices=None):
  """Stage 1: one SGD step of the student on the FSP loss (Eq. 2) only.

  The teacher is frozen: its variables are inputs, never differentiated. Where the
  teacher's matrices are given, either as `teacher_matrices` or cached per example in
  the batch (`batch['teacher_fsp']`, one `(B, m, n)` array per pair), the teacher
  forward pass is skipped and `teacher_variables` may be None.
  """
  images = normalize(batch["image"], mean, std)
  if teacher_matrices is None:
    teacher_matrices = batch.get("teacher_fsp")
  if teacher_matrices is None:
    teacher_matrices = teacher_fsp_matrices(teacher_apply, teacher_variables, images,
                                            fsp_pairs, pool)
  teacher_matrices = jax.lax.stop_gradient(tuple(teacher_matrices))

  def loss_fn(params):
    (_, features), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    student_matrices = fsp.fsp_matrices(features, fsp_pairs, pool)
    loss = fsp.fsp_distance(teacher_matrices, student_matrices, fsp_weights)
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss}


# The jitted steps, built once here so that the pipeline and the benchmark
# (`fsp_jax.bench`) run the very same compiled functions. The state is donated: XLA
# updates parameters and optimizer state in place instead of copying them every step.
def jit_classify_step():
  """`classify_step` as `(state, batch, mean, std) -> (state, metrics)`, jitted."""
  return jax.jit(classify_step, donate_argnums=0)


def jit_fsp_step(teacher_apply, fsp_pairs, fsp_weights, pool):
  """`fsp_step` as `(state, teacher_variables, batch, mean, std) -> (state, metrics)`."""
  return jax.jit(functools.partial(fsp_step, teacher_apply=teacher_apply,
                                   fsp_pairs=fsp_pairs, fsp_weights=fsp_weights,
                                   pool=pool), donate_argnums=0)


def jit_teacher_fsp(teacher_apply, fsp_pairs, pool):
  """`(teacher_variables, images uint8, mean, std) -> matrices`, the teacher's share of
  an FSP step: forward pass in inference mode plus its FSP matrices (`(B, m, n)` each)."""
  def fn(teacher_variables, images, mean, std):
    return teacher_fsp_matrices(teacher_apply, teacher_variables,
                                normalize(images, mean, std), fsp_pairs, pool)
  return jax.jit(fn)


def eval_classify_step(apply_fn, variables, batch, mean, std):
  """Sums over the real (mask 1) examples: correct predictions, loss, count."""
  images = normalize(batch["image"], mean, std)
  logits, _ = apply_fn(variables, images, train=False)
  mask = batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(losses * mask),
          "count": jnp.sum(mask)}


def eval_fsp_step(apply_fn, variables, teacher_variables, batch, mean, std, *,
                  teacher_apply, fsp_pairs, fsp_weights, pool):
  """Sum over real examples of each example's FSP loss (student in inference mode)."""
  images = normalize(batch["image"], mean, std)
  _, features = apply_fn(variables, images, train=False)
  _, teacher_features = teacher_apply(teacher_variables, images, train=False)
  t = fsp.fsp_matrices(teacher_features, fsp_pairs, pool)
  s = fsp.fsp_matrices(features, fsp_pairs, pool)
  weights = fsp_weights or (1.0,) * len(s)
  per_example = sum(w * jnp.sum(jnp.square(a - b), axis=(1, 2))
                    for w, a, b in zip(weights, t, s))
  mask = batch["mask"]
  return {"fsp_loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}


def accumulate(totals: Optional[Dict[str, np.ndarray]], batch_sums) -> Dict[str, np.ndarray]:
  """Adds one batch's sums (device arrays) into running host totals."""
  batch_sums = jax.device_get(batch_sums)
  if totals is None:
    return {k: np.float64(v) for k, v in batch_sums.items()}
  return {k: totals[k] + np.float64(v) for k, v in batch_sums.items()}
