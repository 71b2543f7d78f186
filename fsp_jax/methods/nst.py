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

import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import LayerTerm, Method


@dataclasses.dataclass(frozen=True)
class NST(LayerTerm):
  """Neuron selectivity transfer: MMD of the channels' activation patterns."""
  weight: float = 50.0
  name = "nst"
  label = "NST"
  section = "nst"

  def pair_loss(self, student, teacher):
    return losses.nst_loss(student, teacher)


def defaults() -> ml_collections.ConfigDict:
  """`config.nst`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = each section's output (every feature but the first).
      weight=50.0,
  ))


METHOD = Method(name="nst", section="nst", label="student with NST",
                student_stage="nst", term=NST, color="tab:purple", defaults=defaults)
