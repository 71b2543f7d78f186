"""NST: neuron selectivity transfer (Huang & Wang, 2017).

    L_NST = MMD^2 with the polynomial kernel k(x, y) = (x^T y)^2 between the
    channels' L2-normalised activation patterns of student and teacher,

for each section's output (`losses.nst_loss`); maps of different sizes: the larger is
average-pooled to the smaller.

The term, times `weight` (50.0: RepDistiller's CIFAR setting), is added to the main
task's cross-entropy in one stage (`nst`) from random weights. It reads each
section's output (every feature but the first) (`config.nst.layers`: names or indices
of the student's features; the teacher's of the same names).
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
class NST(Objective):
  """Neuron selectivity transfer: MMD of the channels' activation patterns.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
  """
  layers: Tuple[str, ...]
  weight: float = 50.0
  name = "nst"
  label = "NST"
  section = "nst"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[1:],
                            "nst.layers")
    return cls(layers, section.weight)

  def init(self, rng, teacher_features, student_features) -> Params:
    for layer in self.layers:
      check_feature(layer, teacher_features, "NST layer")
      check_feature(layer, student_features, "NST layer")
    return {}

  def teacher_targets(self, logits, features):
    """The teacher's feature maps `(B, H, W, C)`, one per layer."""
    del logits
    return tuple(features[layer] for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's loss (summed over layers), for every example."""
    del params, step
    loss = sum(
        losses.nst_loss(features[layer], target)
        for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.nst`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = every feature but the first (each section's output).
      weight=50.0,
  ))


METHOD = Method(name="nst", section="nst", label="student with NST",
                student_stage="nst", term=NST, color="tab:purple",
                defaults=defaults)
