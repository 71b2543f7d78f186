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

import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import LayerTerm, Method


@dataclasses.dataclass(frozen=True)
class RKD(LayerTerm):
  """Relational KD: distances and angles among the batch's embeddings."""
  weight: float = 1.0
  distance_weight: float = 25.0
  angle_weight: float = 50.0
  name = "rkd"
  label = "RKD"
  section = "rkd"
  embed = True  # The penultimate embedding: the last map, averaged.

  @staticmethod
  def default_layers(names):
    return names[-1:]  # The last feature map.

  def pair_loss(self, student, teacher):
    return losses.rkd_loss(student, teacher, self.distance_weight,
                           self.angle_weight)


def defaults() -> ml_collections.ConfigDict:
  """`config.rkd`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=1.0,
      distance_weight=25.0,
      angle_weight=50.0,
  ))


METHOD = Method(name="rkd", section="rkd", label="student with RKD",
                student_stage="rkd", term=RKD, color="tab:gray", defaults=defaults)
