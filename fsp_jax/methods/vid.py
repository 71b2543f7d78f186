"""VID: variational information distillation (Ahn et al., CVPR 2019), as RepDistiller
runs it.

For each section's output, a learned regressor (three bias-free 1x1 convolutions with
ReLUs between, to the teacher's channels) predicts the teacher's map from the
student's: the mean `mu(s)` of a Gaussian with a learned per-channel variance
`sigma_c^2 = softplus(alpha_c) + 1e-5` (initially 5); the loss is its negative log
likelihood,

    L_VID = sum_layers mean_{b,h,w,c} 1/2 ((mu_c(s) - t_c)^2 / sigma_c^2 + log sigma_c^2)

(RepDistiller's `distiller_zoo/VID.py`; the constant is dropped). Maps of different
sizes: the larger is average-pooled to the smaller. The regressors and variances are
the method's own parameters, trained with the student and saved apart from it. Weight
1; one main-task stage (`vid`) from random weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, check_feature,
                                  resolve_layers)
from fsp_jax.validation import POSITIVE

_EPS = 1e-5


def conv1x1_init(rng, c_in: int, c_out: int) -> jax.Array:
  """PyTorch's `nn.Conv2d` initialisation of a 1x1 kernel: U(+-1/sqrt(c_in))."""
  bound = 1.0 / math.sqrt(c_in)
  return jax.random.uniform(rng, (c_in, c_out), jnp.float32, -bound, bound)


@dataclasses.dataclass(frozen=True)
class VID(Objective):
  """Variational information distillation on each layer.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (1).
    init_variance: the variances' initial value (5).
  """
  layers: Tuple[str, ...]
  weight: float = 1.0
  init_variance: float = 5.0
  name = "vid"
  label = "VID"
  section = "vid"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[1:],
                            "vid.layers")
    return cls(layers, section.weight, section.init_variance)

  def init(self, rng, teacher_features, student_features) -> Params:
    """Per layer `{'w1': (C_s, C_t), 'w2': (C_t, C_t), 'w3': (C_t, C_t), 'alpha':
    (C_t,)}`."""
    params = {}
    alpha = math.log(math.expm1(self.init_variance - _EPS))  # softplus^-1
    for k, layer in enumerate(self.layers):
      check_feature(layer, teacher_features, "VID layer")
      check_feature(layer, student_features, "VID layer")
      c_s = student_features[layer].shape[-1]
      c_t = teacher_features[layer].shape[-1]
      r1, r2, r3 = jax.random.split(jax.random.fold_in(rng, k), 3)
      params[layer] = {"w1": conv1x1_init(r1, c_s, c_t), "w2": conv1x1_init(r2, c_t, c_t),
                       "w3": conv1x1_init(r3, c_t, c_t),
                       "alpha": jnp.full((c_t,), alpha, jnp.float32)}
    return params

  def teacher_targets(self, logits, features):
    """The teacher's feature maps `(B, H, W, C)`, one per layer."""
    del logits
    return tuple(features[layer] for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's L_VID, for every example."""
    del step
    total = 0.0
    for layer, target in zip(self.layers, targets):
      p = params[layer]
      s, t = losses.match_spatial(features[layer].astype(jnp.float32),
                                  jax.lax.stop_gradient(target).astype(jnp.float32),
                                  f"VID layer {layer!r}")
      # Positions as rows of one (B H W, C) matrix: a 1x1 convolution is one product,
      # and its weights' gradient one more (on the 4-D maps XLA:CPU took ~1.3x as long).
      s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
      mean = jax.nn.relu(s @ p["w1"])
      mean = jax.nn.relu(mean @ p["w2"]) @ p["w3"]
      variance = jax.nn.softplus(p["alpha"]) + _EPS
      nll = 0.5 * (jnp.square(mean - t) / variance + jnp.log(variance))
      total = total + jnp.mean(nll)
    return batch_loss(self.weight * total, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.vid`: RepDistiller's CIFAR setting."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = every feature but the first (each section's output).
      weight=1.0,
      init_variance=5.0,  # the learned variances' start.
  ))


METHOD = Method(name="vid", section="vid", label="student with VID", student_stage="vid",
                term=VID, color="tab:orange", defaults=defaults,
                checks=(("init_variance", POSITIVE),))
