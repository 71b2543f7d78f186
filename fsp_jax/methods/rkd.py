"""RKD: relational knowledge distillation (Park et al., CVPR 2019).

    L_RKD = 25 * smoothL1(psi_D(s), psi_D(t)) + 50 * smoothL1(psi_A(s), psi_A(t)),

distances of the batch's embedding pairs (normalised by their mean) and angles of its
triplets, on the penultimate embedding (`losses.rkd_loss`).

The term, times `weight` (1.0: RepDistiller's CIFAR setting), is added to the main
task's cross-entropy in one stage (`rkd`) from random weights. It reads the
penultimate embedding (the last feature map, averaged over its positions)
(`config.rkd.layers`: names or indices of the student's features; the teacher's of
the same names).
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
class RKD(Objective):
  """Relational KD: distances and angles among the batch's embeddings.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
    distance_weight, angle_weight: the two parts' weights (25, 50).
  """
  layers: Tuple[str, ...]
  weight: float = 1.0
  distance_weight: float = 25.0
  angle_weight: float = 50.0
  name = "rkd"
  label = "RKD"
  section = "rkd"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                            "rkd.layers")
    return cls(layers, section.weight, section.distance_weight, section.angle_weight)

  def init(self, rng, teacher_features, student_features) -> Params:
    for layer in self.layers:
      check_feature(layer, teacher_features, "RKD layer")
      check_feature(layer, student_features, "RKD layer")
    return {}

  def teacher_targets(self, logits, features):
    """The teacher's embeddings `(B, D)`, one per layer."""
    del logits
    return tuple(embedding(features[layer]) for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's loss (summed over layers), for every example."""
    del params, step
    loss = sum(
        losses.rkd_loss(embedding(features[layer]), target, self.distance_weight,
                        self.angle_weight)
        for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.rkd`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=1.0,
      distance_weight=25.0,
      angle_weight=50.0,
  ))


METHOD = Method(name="rkd", section="rkd", label="student with RKD",
                student_stage="rkd", term=RKD, color="tab:gray",
                defaults=defaults)
