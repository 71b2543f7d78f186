"""DKD: decoupled knowledge distillation (Zhao et al., CVPR 2022).

    L_DKD = alpha * TCKD + beta * NCKD,

KD split into the target class's binary KL (TCKD) and the KL among the other classes
(NCKD), both at temperature T and times T^2 (`losses.dkd_loss`, mdistiller's). The term
is added to the main task's cross-entropy in one stage (`dkd`) from random weights,
its weight rising linearly over the first `warmup_fraction` of the stage (mdistiller:
20 of 240 epochs). Reads the logits and the labels only.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import Method, Objective, Params
from fsp_jax.validation import NON_NEGATIVE, ConfigError, Range


@dataclasses.dataclass(frozen=True)
class DKD(Objective):
  """mdistiller's DKD on CIFAR: alpha 1, beta 8, T 4, a 20/240 warm-up.

  Attributes:
    alpha, beta: the weights of TCKD and NCKD.
    temperature: T.
    warmup_fraction: the share of the stage over which the term's weight rises
      linearly from 1/W to 1 (W = that many steps); 0 = none.
    num_steps: the stage's length.
  """
  alpha: float = 1.0
  beta: float = 8.0
  temperature: float = 4.0
  warmup_fraction: float = 20 / 240
  num_steps: int = 1
  name = "dkd"
  label = "DKD"
  section = "dkd"
  reads_labels = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del feature_names
    return cls(section.alpha, section.beta, section.temperature,
               section.warmup_fraction, num_steps)

  def teacher_targets(self, logits, features):
    """The teacher's logits `(B, K)`."""
    del features
    return logits

  def warmup_at(self, step) -> jax.Array:
    """The term's weight at `step`: min((step + 1) / W, 1), W the warm-up's steps."""
    steps = self.warmup_fraction * self.num_steps
    if steps <= 0:
      return jnp.ones((), jnp.float32)
    return jnp.minimum((jnp.asarray(step, jnp.float32) + 1.0) / steps, 1.0)

  def objective(self, params: Params, targets, logits, features, step,
                labels=None) -> jax.Array:
    """`(B,)`: the warmed-up DKD loss of the batch, for every example."""
    del params, features
    if labels is None:
      raise ConfigError("DKD needs the labels (a main-task stage).")
    if targets.shape != logits.shape:
      raise ConfigError(f"DKD needs teacher and student logits of one shape; got "
                        f"teacher {targets.shape} and student {logits.shape}.")
    loss = losses.dkd_loss(logits, jax.lax.stop_gradient(targets), labels, self.alpha,
                           self.beta, self.temperature)
    return jnp.full((logits.shape[0],), self.warmup_at(step) * loss, jnp.float32)


def defaults() -> ml_collections.ConfigDict:
  """`config.dkd`: mdistiller's CIFAR-100 setting."""
  return ml_collections.ConfigDict(dict(
      alpha=1.0,  # TCKD's weight.
      beta=8.0,  # NCKD's weight.
      temperature=4.0,
      warmup_fraction=20 / 240,  # of the stage: mdistiller's 20 of 240 epochs.
  ))


METHOD = Method(name="dkd", section="dkd", label="student with DKD", student_stage="dkd",
                term=DKD, color="tab:green", defaults=defaults,
                checks=(("alpha", NON_NEGATIVE), ("beta", NON_NEGATIVE),
                        ("warmup_fraction", Range(0, 1))))
