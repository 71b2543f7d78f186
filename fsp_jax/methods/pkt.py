"""PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

    L_PKT = mean_ij p_ij log(p_ij / q_ij),  p_ij = (1 + cos(t_i, t_j)) / 2 normalised over j

(q the student's), on the penultimate embedding: the last feature map averaged over its
positions, the classifier's input (`losses.pkt_loss`).

The term, times `weight` (30000.0: RepDistiller's CIFAR setting), is added to the
main task's cross-entropy in one stage (`pkt`) from random weights. It reads the
penultimate embedding (the last feature map, averaged over its positions)
(`config.pkt.layers`: names or indices of the student's features; the teacher's of
the same names).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import LayerTerm, Method


@dataclasses.dataclass(frozen=True)
class PKT(LayerTerm):
  """Probabilistic knowledge transfer on the penultimate embedding."""
  weight: float = 30000.0
  name = "pkt"
  label = "PKT"
  section = "pkt"
  embed = True  # The penultimate embedding: the last map, averaged.

  @staticmethod
  def default_layers(names):
    return names[-1:]  # The last feature map.

  def pair_loss(self, student, teacher):
    return losses.pkt_loss(student, teacher)


def defaults() -> ml_collections.ConfigDict:
  """`config.pkt`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=30000.0,
  ))


METHOD = Method(name="pkt", section="pkt", label="student with PKT",
                student_stage="pkt", term=PKT, color="tab:cyan", defaults=defaults)
