"""SP: similarity-preserving distillation (Tung & Mori, ICCV 2019).

    L_SP = 1/B^2 || G_T - G_S ||_F^2,  G = row-normalised (F F^T), F = (B, H*W*C)

of the last feature map (`losses.sp_loss`): the student keeps the teacher's pairwise
similarities of the batch's examples.

The term, times `weight` (3000.0: RepDistiller's CIFAR setting), is added to the main
task's cross-entropy in one stage (`sp`) from random weights. It reads the last
feature map (`config.sp.layers`: names or indices of the student's features; the
teacher's of the same names).
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
class SP(Objective):
  """Similarity preserving: the batch's example-by-example similarity matrix.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
  """
  layers: Tuple[str, ...]
  weight: float = 3000.0
  name = "sp"
  label = "SP"
  section = "sp"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                            "sp.layers")
    return cls(layers, section.weight)

  def init(self, rng, teacher_features, student_features) -> Params:
    for layer in self.layers:
      check_feature(layer, teacher_features, "SP layer")
      check_feature(layer, student_features, "SP layer")
    return {}

  def teacher_targets(self, logits, features):
    """The teacher's feature maps `(B, H, W, C)`, one per layer."""
    del logits
    return tuple(features[layer] for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's loss (summed over layers), for every example."""
    del params, step
    loss = sum(
        losses.sp_loss(features[layer], target)
        for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.sp`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map.
      weight=3000.0,
  ))


METHOD = Method(name="sp", section="sp", label="student with SP",
                student_stage="sp", term=SP, color="tab:pink",
                defaults=defaults)
