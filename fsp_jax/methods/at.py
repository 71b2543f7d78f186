"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    L_AT = sum_j mean_{b,p} (a(S_j)[b, p] - a(T_j)[b, p])^2,
    a(F) = vec(mean_c F_c^p) / ||vec(mean_c F_c^p)||_2,

the spatial attention maps of each section's output (`losses.at_loss`, p = 2); maps of
different sizes: the larger is average-pooled to the smaller.

The term, times `weight` (1000.0: RepDistiller's CIFAR setting), is added to the main
task's cross-entropy in one stage (`at`) from random weights. It reads each section's
output (every feature but the first) (`config.at.layers`: names or indices of the
student's features; the teacher's of the same names).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax
import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, check_feature,
                                  embedding, resolve_layers)


@dataclasses.dataclass(frozen=True)
class AT(Objective):
  """Attention transfer on each layer's spatial attention map.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
    p: the power of the attention map (2).
  """
  layers: Tuple[str, ...]
  weight: float = 1000.0
  p: float = 2.0
  name = "at"
  label = "AT"
  section = "at"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[1:],
                            "at.layers")
    return cls(layers, section.weight, section.p)

  def init(self, rng, teacher_features, student_features) -> Params:
    for layer in self.layers:
      check_feature(layer, teacher_features, "AT layer")
      check_feature(layer, student_features, "AT layer")
    return {}

  def teacher_targets(self, logits, features):
    """The teacher's feature maps `(B, H, W, C)`, one per layer."""
    del logits
    return tuple(features[layer] for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's loss (summed over layers), for every example."""
    del params, step
    loss = sum(
        losses.at_loss(features[layer], target, self.p)
        for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.at`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = every feature but the first (each section's output).
      weight=1000.0,
      p=2.0,  # attention map: mean over channels of |F|^p.
  ))


METHOD = Method(name="at", section="at", label="student with AT",
                student_stage="at", term=AT, color="tab:olive",
                defaults=defaults)
