"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    L_AT = sum_j mean_{b,p} (a(S_j)[b, p] - a(T_j)[b, p])^2,
    a(F) = vec(mean_c F_c^p) / ||vec(mean_c F_c^p)||_2,

the spatial attention maps of each section's output (`losses.at_loss`, p = 2); maps of
different sizes: the larger is average-pooled to the smaller.

The term, times `weight` (1000.0: RepDistiller's CIFAR setting), is added to the main
task's cross-entropy in one stage (`at`) from random weights. It reads each section's
output (`config.at.layers`: names or indices of the student's features; the teacher's
of the same names).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import LayerTerm, Method


@dataclasses.dataclass(frozen=True)
class AT(LayerTerm):
  """Attention transfer on each layer's spatial attention map."""
  weight: float = 1000.0
  p: float = 2.0  # The attention map: mean over channels of |F|^p.
  name = "at"
  label = "AT"
  section = "at"

  def pair_loss(self, student, teacher):
    return losses.at_loss(student, teacher, self.p)


def defaults() -> ml_collections.ConfigDict:
  """`config.at`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = each section's output (every feature but the first).
      weight=1000.0,
      p=2.0,  # attention map: mean over channels of |F|^p.
  ))


METHOD = Method(name="at", section="at", label="student with AT",
                student_stage="at", term=AT, color="tab:olive", defaults=defaults)
