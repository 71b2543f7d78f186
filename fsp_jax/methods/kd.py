"""Hinton et al. (2015) knowledge distillation: softened teacher logits, one main-task
stage (`kd`) from random weights with the KD term added to the cross-entropy. FitNet's
stage 2 adds the same term (`config.kd`)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax.methods.base import Method, Objective, Params
from fsp_jax.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class KD(Objective):
  """weight(step) * [T^2] * KL(softmax(z_t / T) || softmax(z_s / T)) per example, a
  term added to the main-task cross-entropy (the trainer adds the latter). KL has the
  gradients of the FitNet paper's cross-entropy H(P_t^T, P_s^T) and is 0 at a match.

  Attributes:
    temperature: T (the paper's FitNet stage 2: 3).
    weight: the term's weight at step 0.
    final_weight: where given, the weight moves linearly from `weight` at step 0 to
      this at step `num_steps - 1` (the paper's FitNet stage 2: 4 -> 1).
    num_steps: the stage's length, for the linear schedule.
    scale_by_t_squared: multiply by T^2 as Hinton et al. do to keep gradient scale;
      off by default (the FitNet formula).
  """
  temperature: float = 3.0
  weight: float = 1.0
  final_weight: Optional[float] = None
  num_steps: int = 1
  scale_by_t_squared: bool = False
  name = "kd"
  label = "KD"
  section = "kd"

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    """From `config.kd`, for a stage of `num_steps` (the weight's linear schedule)."""
    del feature_names
    return cls(section.temperature, section.weight, section.final_weight, num_steps,
               section.scale_by_t_squared)

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's logits `(B, K)`."""
    del features
    return logits

  def weight_at(self, step) -> jax.Array:
    if self.final_weight is None:
      return jnp.asarray(self.weight, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(self.num_steps - 1, 1), 1.0)
    return self.weight + (self.final_weight - self.weight) * frac

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: the weighted KL divergence of each example."""
    del params, features
    if targets.shape != logits.shape:
      raise ConfigError(f"KD needs teacher and student logits of one shape; got teacher "
                        f"{targets.shape} and student {logits.shape}: the two must "
                        "classify the same classes.")
    t = self.temperature
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(targets).astype(jnp.float32) / t)
    log_p_s = jax.nn.log_softmax(logits.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    scale = t * t if self.scale_by_t_squared else 1.0
    return self.weight_at(step) * scale * kl


def defaults() -> ml_collections.ConfigDict:
  """`config.kd`: weight * KL(softmax(teacher/T) || softmax(student/T)); the paper's
  FitNet: T = 3, weight decaying linearly from 4 to 1 over the stage."""
  return ml_collections.ConfigDict(dict(
      temperature=3.0,
      weight=4.0,
      final_weight=1.0,  # None keeps `weight` constant.
      scale_by_t_squared=False,  # Hinton et al. multiply by T^2.
  ))


METHOD = Method(name="kd", section="kd", label="student with Hinton KD",
                student_stage="kd", term=KD, color="tab:brown", defaults=defaults)
