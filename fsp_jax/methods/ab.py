"""AB: distillation of activation boundaries (Heo et al., AAAI 2019), as RepDistiller
runs it: a method-only stage 1, then the main task.

Stage 1 (`ab_init`) trains the student, through a learned connector per layer (a
bias-free 1x1 convolution to the teacher's channels, then a normalisation over the
batch with a learned scale and shift), to put each neuron on the teacher's side of
its activation boundary with a margin m = 1:

    L_AB = 3/1000 sum_j w_j sum_{h,w,c} (r + m)^2 [r > -m, t <= 0] + (r - m)^2 [r <= m, t > 0]

per example, with `r` the connector's output, `t` the teacher's map and `w_j = 2^(j-n+1)`
for the n layers (RepDistiller's `distiller_zoo/AB.py`: its sum over the batch divided
by the batch size is this per-example loss averaged). The teacher's maps here are
post-ReLU, whose sign test equals RepDistiller's on pre-activations (t > 0 exactly
where the pre-activation is); the connector normalises with the batch's statistics
(RepDistiller's BatchNorm keeps running ones for its evaluation only). Stage 2
(`ab`) trains the main task from the stage-1 weights with cross-entropy alone. Maps of
different sizes: the larger is average-pooled to the smaller.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import config_lib, losses
from fsp_jax.methods.base import (Method, Objective, Params, check_feature,
                                  resolve_layers)
from fsp_jax.validation import POSITIVE


@dataclasses.dataclass(frozen=True)
class AB(Objective):
  """Activation-boundary transfer through learned connectors.

  Attributes:
    layers: the features read, student and teacher alike (each section's output).
    margin: m (1).
  """
  layers: Tuple[str, ...]
  margin: float = 1.0
  name = "ab"
  label = "AB"
  section = "ab"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[1:],
                            "ab.layers")
    return cls(layers, section.margin)

  def init(self, rng, teacher_features, student_features) -> Params:
    """Per layer `{'kernel': (C_s, C_t), 'scale': (C_t,), 'bias': (C_t,)}`."""
    params = {}
    for k, layer in enumerate(self.layers):
      check_feature(layer, teacher_features, "AB layer")
      check_feature(layer, student_features, "AB layer")
      c_s = student_features[layer].shape[-1]
      c_t = teacher_features[layer].shape[-1]
      bound = 1.0 / math.sqrt(c_s)  # PyTorch's Conv2d initialisation.
      params[layer] = {
          "kernel": jax.random.uniform(jax.random.fold_in(rng, k), (c_s, c_t),
                                       jnp.float32, -bound, bound),
          "scale": jnp.ones((c_t,), jnp.float32), "bias": jnp.zeros((c_t,), jnp.float32)}
    return params

  def teacher_targets(self, logits, features):
    """The teacher's feature maps `(B, H, W, C)`, one per layer."""
    del logits
    return tuple(features[layer] for layer in self.layers)

  def connect(self, p: Params, feature: jax.Array) -> jax.Array:
    """The connector: 1x1 convolution, then normalisation over the batch's positions."""
    y = feature.astype(jnp.float32) @ p["kernel"]
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.var(y, axis=(0, 1, 2))
    return (y - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: the weighted boundary loss of each example."""
    del logits, step
    m, n = self.margin, len(self.layers)
    total = 0.0
    for j, (layer, target) in enumerate(zip(self.layers, targets)):
      r, t = losses.match_spatial(self.connect(params[layer], features[layer]),
                                  jax.lax.stop_gradient(target).astype(jnp.float32),
                                  f"AB layer {layer!r}")
      per = (jnp.square(r + m) * ((r > -m) & (t <= 0))
             + jnp.square(r - m) * ((r <= m) & (t > 0)))
      total = total + 2.0 ** (j - n + 1) * jnp.sum(per, axis=(1, 2, 3))
    return total * 3.0 / 1000.0


def defaults() -> ml_collections.ConfigDict:
  """`config.ab`: stage 1's layers, margin and schedule."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = every feature but the first (each section's output).
      margin=1.0,
      # RepDistiller: 30 epochs at LR 0.05 before the main task (about 1/8 of it).
      schedule=config_lib.schedule(8000, (0.05,), ()),
      checkpoint="",  # A finished stage 1 to reuse (its stage directory).
  ))


def smoke(section) -> None:
  """A stage 1 of 8 steps at LR 0.01 for `:smoke` configs (AB's and FT's)."""
  section.checkpoint = ""
  section.schedule = config_lib.schedule(8, (0.01,), (), batch_size=32,
                                         augment=section.schedule.augment)


METHOD = Method(name="ab", section="ab", label="AB student (stage 2)", student_stage="ab",
                stage_one=AB, stage_one_name="ab_init", color="tab:red", defaults=defaults,
                smoke=smoke, checks=(("margin", POSITIVE),))
