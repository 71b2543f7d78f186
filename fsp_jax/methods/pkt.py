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
from typing import Sequence, Tuple

import jax
import ml_collections

from fsp_jax import losses
from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, check_feature,
                                  embedding, resolve_layers)


@dataclasses.dataclass(frozen=True)
class PKT(Objective):
  """Probabilistic knowledge transfer on the penultimate embedding.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
  """
  layers: Tuple[str, ...]
  weight: float = 30000.0
  name = "pkt"
  label = "PKT"
  section = "pkt"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                            "pkt.layers")
    return cls(layers, section.weight)

  def init(self, rng, teacher_features, student_features) -> Params:
    for layer in self.layers:
      check_feature(layer, teacher_features, "PKT layer")
      check_feature(layer, student_features, "PKT layer")
    return {}

  def teacher_targets(self, logits, features):
    """The teacher's embeddings `(B, D)`, one per layer."""
    del logits
    return tuple(embedding(features[layer]) for layer in self.layers)

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's loss (summed over layers), for every example."""
    del params, step
    loss = sum(
        losses.pkt_loss(embedding(features[layer]), target)
        for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.pkt`."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=30000.0,
  ))


METHOD = Method(name="pkt", section="pkt", label="student with PKT",
                student_stage="pkt", term=PKT, color="tab:cyan",
                defaults=defaults)
