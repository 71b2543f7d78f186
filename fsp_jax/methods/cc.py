"""CC: correlation congruence (Peng et al., ICCV 2019), as RepDistiller runs it.

Student and teacher penultimate embeddings (the last feature map averaged over its
positions) are each mapped by a learned linear layer to `embed_dim` (128) and
L2-normalised, `f_s`, `f_t`; with `d = |f_s - f_t|` (B, 128),

    L_CC = mean_i sum_k d[i, k] d[i + 1, k]

(RepDistiller's `distiller_zoo/CC.py`). Both linear layers are the method's own
parameters, trained with the student (the teacher stays frozen) and saved apart from
it. Weight 0.02; one main-task stage (`cc`) from random weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, check_feature,
                                  embedding, resolve_layers)
from fsp_jax.validation import COUNT


def linear_init(rng, fan_in: int, fan_out: int) -> Params:
  """PyTorch's `nn.Linear` initialisation: weight and bias U(-1/sqrt(fan_in), ...)."""
  bound = 1.0 / math.sqrt(fan_in)
  k_w, k_b = jax.random.split(rng)
  return {"kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound,
                                       bound),
          "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound)}


def embeddings_init(rng, layer: str, teacher_features, student_features, dim: int,
                    what: str) -> Params:
  """`{'embed_s', 'embed_t'}`: linear maps of the student's and the teacher's
  embedding of `layer` to `dim` (`linear_init`); fails where `layer` is missing."""
  check_feature(layer, teacher_features, what)
  check_feature(layer, student_features, what)
  k_s, k_t = jax.random.split(rng)
  return {"embed_s": linear_init(k_s, student_features[layer].shape[-1], dim),
          "embed_t": linear_init(k_t, teacher_features[layer].shape[-1], dim)}


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows divided by their L2 norm (RepDistiller's `Normalize`; finite at 0)."""
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


@dataclasses.dataclass(frozen=True)
class CC(Objective):
  """Correlation congruence of learned, normalised 128-d embeddings.

  Attributes:
    layers: the one feature whose pooled map is the embedding (the last).
    weight: the term's weight (0.02).
    embed_dim: the embeddings' width (128).
  """
  layers: Tuple[str, ...]
  weight: float = 0.02
  embed_dim: int = 128
  name = "cc"
  label = "CC"
  section = "cc"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                            "cc.layers")
    return cls(layers[-1:], section.weight, section.embed_dim)

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'embed_s': {'kernel': (C_s, D), 'bias': (D,)}, 'embed_t': ...}`."""
    return embeddings_init(rng, self.layers[0], teacher_features, student_features,
                           self.embed_dim, "CC layer")

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's embedding `(B, C_t)`."""
    del logits
    return embedding(features[self.layers[0]])

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's L_CC, for every example."""
    del step
    def embed(p, x):
      return l2_normalize(x @ p["kernel"] + p["bias"])
    f_s = embed(params["embed_s"], embedding(features[self.layers[0]]))
    f_t = embed(params["embed_t"], jax.lax.stop_gradient(targets))
    delta = jnp.abs(f_s - f_t)
    loss = jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.cc`: RepDistiller's CIFAR setting."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=0.02,
      embed_dim=128,  # the learned embeddings' width.
  ))


METHOD = Method(name="cc", section="cc", label="student with CC", student_stage="cc",
                term=CC, color="tab:blue", defaults=defaults,
                checks=(("embed_dim", COUNT),))
