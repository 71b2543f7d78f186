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

import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import LayerTerm, Method


@dataclasses.dataclass(frozen=True)
class SP(LayerTerm):
  """Similarity preserving: the batch's example-by-example similarity matrix."""
  weight: float = 3000.0
  name = "sp"
  label = "SP"
  section = "sp"

  @staticmethod
  def default_layers(names):
    return names[-1:]  # The last feature map.

  def pair_loss(self, student, teacher):
    return losses.sp_loss(student, teacher)


def defaults() -> ml_collections.ConfigDict:
  """`config.sp`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map.
      weight=3000.0,
  ))


METHOD = Method(name="sp", section="sp", label="student with SP",
                student_stage="sp", term=SP, color="tab:pink", defaults=defaults)
