"""The optimisation of every stage: the paper's piecewise-constant learning rate in
iterations and SGD with momentum and L2 weight decay (PyTorch's SGD)."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fsp_jax import validation


def create_learning_rate_fn(learning_rates: Sequence[float], boundaries: Sequence[int],
                            warmup_steps: int = 0) -> Callable[[jax.Array], jax.Array]:
  """Piecewise-constant learning rate in iterations, as the paper states schedules.

  `learning_rates[k]` holds for `boundaries[k-1] <= step < boundaries[k]`; e.g.
  (0.1, 0.01, 0.001) with boundaries (32000, 48000). `warmup_steps` W > 0 multiplies
  the first W steps' rates by (step + 1) / W (a linear warm-up; not in the paper).
  One function per schedule (the same object for the same settings).
  """
  validation.check_boundaries(learning_rates, boundaries)
  return _learning_rate_fn(tuple(float(v) for v in learning_rates),
                           tuple(int(b) for b in boundaries), int(warmup_steps))


@functools.lru_cache(maxsize=256)
def _learning_rate_fn(learning_rates, boundaries, warmup_steps):
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


def with_frozen(tx: optax.GradientTransformation,
                trainable: Callable) -> optax.GradientTransformation:
  """`tx` on the parameters where `trainable(params)` (a tree of bools like them) is
  True; the others never move (no update, no weight decay)."""
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                  trainable(params)))
