"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), as
RepDistiller runs it on CIFAR.

Student and teacher penultimate embeddings (the last feature map averaged over its
positions) are each mapped by a learned linear layer to `embed_dim` (128) and
L2-normalised, `f_s`, `f_t`. A memory bank holds a 128-d vector of every training
example for each side, `m_s`, `m_t` `(N, 128)`. For example `i` of the batch with
`K` (16384) negatives `j_1..j_K` drawn from the training examples of other classes,
with temperature `T` (0.07),

    P_s(i, j) = exp(m_t[j] . f_s(i) / T) / Z_s,   P_t(i, j) = exp(m_s[j] . f_t(i) / T) / Z_t,

`Z_s`, `Z_t` fixed at the first step (the mean of that batch's `exp(. / T)` times N), and
with `P_n = 1 / N`, `eps = 1e-7`, each side's noise-contrastive loss is

    L(P) = -1/B sum_i [ log(P(i,i) / (P(i,i) + K P_n + eps))
                        + sum_k log(K P_n / (P(i,j_k) + K P_n + eps)) ],

and L_CRD = L(P_s) + L(P_t) (RepDistiller's `crd/criterion.py`, `ContrastMemory` and
`ContrastLoss`). After each step the bank rows of the batch move to the new
embeddings with momentum 0.5 and are renormalised:
`m[i] <- normalise(0.5 m[i] + 0.5 f(i))`. The bank starts uniform in
`+-1/sqrt(128/3)`. Negatives are drawn with replacement (RepDistiller's CIFAR loader,
mode 'exact', draws them without replacement: a few percent of repeats at 16384 of
45000, the same distribution otherwise), from a random stream of `(seed, step)`, so a
resumed run draws what an uninterrupted one does. The linear layers are the method's
own parameters, trained with the student; the bank and the normalisation constants
are its state, checkpointed and kept per seed. Weight 0.8; one main-task stage (`crd`)
from random weights; `crd+kd` adds Hinton KD (RepDistiller's CRD+KD row).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, embedding,
                                  resolve_layers)
from fsp_jax.methods.cc import embeddings_init, l2_normalize
from fsp_jax.validation import COUNT, POSITIVE, ConfigError, Range

_EPS = 1e-7


def contrast_loss(positives: jax.Array, negatives: jax.Array, num_examples: int,
                  num_negatives: int, weights=None) -> jax.Array:
  """RepDistiller's `ContrastLoss` of `positives` `(B,)` (each `P(i, i)`) and
  `negatives` `(B, M)` (each `P(i, j)`, the K drawn negatives, M = K), a scalar; with
  `weights` `(B, M)`, each negative counted that many times (M = N, the whole bank
  scored and `weights` how often each row was drawn)."""
  noise = num_negatives / float(num_examples)
  log_pos = jnp.log(positives / (positives + noise + _EPS))
  log_neg = jnp.log(noise / (negatives + noise + _EPS))
  if weights is not None:
    log_neg = weights * log_neg
  return -(jnp.sum(log_pos) + jnp.sum(log_neg)) / positives.shape[0]


def negatives(key, labels: jax.Array, state: Params, k: int) -> jax.Array:
  """`(B, K)` rows of training examples whose class is not the batch's `labels`,
  uniform with replacement (a 32-bit draw modulo the number of such rows: a bias
  below that number / 2^32): `state['order']` lists the rows by class, class c's at
  `start[c] .. start[c] + count[c] - 1`."""
  start, count = state["start"][labels], state["count"][labels]
  n_other = (state["order"].shape[0] - count).astype(jnp.uint32)
  u = (jax.random.bits(key, (labels.shape[0], k), jnp.uint32)
       % n_other[:, None]).astype(jnp.int32)
  return state["order"][u + jnp.where(u >= start[:, None], count[:, None], 0)]


def scores_whole_bank(num_examples: int, num_negatives: int) -> bool:
  """Whether to score every bank row (one `(B, D) x (D, N)` product) rather than
  gather the `B x K` drawn rows: where the bank is at most 8 times K rows."""
  return num_examples <= 8 * (num_negatives + 1)


def bank_scores(memory: jax.Array, embeddings: jax.Array, rows: jax.Array) -> jax.Array:
  """`memory[rows[b, j]] . embeddings[b]` `(B, J)` for a bank `(N, D)`, embeddings
  `(B, D)`, by gathering the B x J rows (for banks too large to score whole)."""
  return jnp.einsum("bjd,bd->bj", memory[rows], embeddings,
                    precision=jax.lax.Precision.HIGHEST)


def draw_counts(rows: jax.Array, num_examples: int) -> jax.Array:
  """`(B, N)` float32: how often each bank row appears in `rows[b]` `(B, K)`.

  One float32 scatter-add into the flattened `(B * N,)` counts (exact: a count is at
  most K < 2^24): ~3x quicker on XLA:CPU than adding int32 ones at `(b, row)` pairs
  and converting."""
  b, n = rows.shape[0], num_examples
  flat = (rows + (jnp.arange(b, dtype=rows.dtype) * n)[:, None]).reshape(-1)
  return jnp.zeros((b * n,), jnp.float32).at[flat].add(1.0).reshape(b, n)


def side_scores(memory: jax.Array, embeddings: jax.Array, index: jax.Array,
                rows: jax.Array, counts, temperature: float):
  """One side's `exp(m . f / T)`: `(positives (B,), negatives (B, M))`, M = K drawn
  rows, or M = N (every row, to be weighted by `counts`) where `counts` is given."""
  if counts is None:
    scores = jnp.exp(bank_scores(memory, embeddings,
                                 jnp.concatenate([index[:, None], rows], 1))
                     / temperature)
    return scores[:, 0], scores[:, 1:]
  full = jnp.exp(jnp.matmul(embeddings, memory.T, precision=jax.lax.Precision.HIGHEST)
                 / temperature)
  # Each positive from its own bank row (B rows), not picked out of `full`: picking
  # it scatters its gradient into a fresh B x N array (~1/4 of the term, measured).
  positives = jnp.exp(jnp.sum(memory[index] * embeddings, -1) / temperature)
  return positives, full


def update_bank(memory: jax.Array, rows: jax.Array, embeddings: jax.Array,
                momentum: float) -> jax.Array:
  """`memory` with `rows` moved to `embeddings` by `momentum`, renormalised."""
  memory = jnp.asarray(memory)
  moved = memory[rows] * momentum + embeddings * (1.0 - momentum)
  moved = moved / jnp.sqrt(jnp.sum(moved * moved, -1, keepdims=True))
  return memory.at[rows].set(moved)


@dataclasses.dataclass(frozen=True)
class CRD(Objective):
  """Contrastive representation distillation with a memory bank.

  Attributes:
    layers: the one feature whose pooled map is the embedding (the last).
    weight: the term's weight (0.8).
    embed_dim: the embeddings' width (128).
    num_negatives: negatives per example (16384).
    temperature: T (0.07).
    momentum: the bank's momentum (0.5).
  """
  layers: Tuple[str, ...]
  weight: float = 0.8
  embed_dim: int = 128
  num_negatives: int = 16384
  temperature: float = 0.07
  momentum: float = 0.5
  name = "crd"
  label = "CRD"
  section = "crd"
  reads_features = True
  reads_labels = True
  reads_index = True
  stateful = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                            "crd.layers")
    return cls(layers[-1:], section.weight, section.embed_dim, section.num_negatives,
               section.temperature, section.momentum)

  def check_training_set(self, train_labels: np.ndarray, num_seeds: int) -> None:
    """Fails where the training set gives no negatives (one class) or its bank
    would not fit in host memory."""
    classes = np.unique(np.asarray(train_labels))
    if classes.size < 2:
      raise ConfigError("CRD draws each example's negatives from the training examples "
                        f"of other classes, but the training set has {classes.size} "
                        "class: use another method or data set.")
    nbytes = 2 * len(train_labels) * self.embed_dim * 4 * num_seeds
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.5 * available:
      raise ConfigError(f"CRD's memory bank of {len(train_labels)} training examples x "
                        f"{self.embed_dim} x 2 sides x {num_seeds} seeds needs "
                        f"{nbytes / 2**30:.1f} GiB, over half the {available / 2**30:.1f} "
                        "GiB free: lower crd.embed_dim or config.num_seeds.")

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'embed_s': {'kernel': (C_s, D), 'bias': (D,)}, 'embed_t': ...}` (CC's)."""
    return embeddings_init(rng, self.layers[0], teacher_features, student_features,
                           self.embed_dim, "CRD layer")

  def init_state(self, rng, train_labels) -> Params:
    """The banks `memory_s`, `memory_t` `(N, D)`, `z` `(2,)` (-1: not yet set), the
    rows by class (`order` `(N,)`, `start`, `count` per class) and the key of the
    negatives' stream."""
    n = train_labels.shape[0]
    k_s, k_t, k_n = jax.random.split(rng, 3)
    stdv = 1.0 / math.sqrt(self.embed_dim / 3)
    bank = lambda k: jax.random.uniform(k, (n, self.embed_dim), jnp.float32, -stdv,  # noqa: E731
                                        stdv)
    labels = train_labels.astype(jnp.int32)
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)
    count = jnp.bincount(labels, length=n).astype(jnp.int32)  # (class ids are < N)
    start = (jnp.cumsum(count) - count).astype(jnp.int32)
    return {"memory_s": bank(k_s), "memory_t": bank(k_t),
            "z": jnp.full((2,), -1.0, jnp.float32), "order": order, "start": start,
            "count": count, "key": k_n}

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's embedding `(B, C_t)`."""
    del logits
    return embedding(features[self.layers[0]])

  def objective(self, params: Params, targets, logits, features, step, *, labels,
                index, state):
    """`((B,), state)`: weight x the batch's L_CRD for every example, and the state
    with the batch's bank rows moved and Z set at the first step."""
    n = state["memory_s"].shape[0]
    f_s = l2_normalize(embedding(features[self.layers[0]]) @ params["embed_s"]["kernel"]
                       + params["embed_s"]["bias"])
    f_t = l2_normalize(jax.lax.stop_gradient(targets) @ params["embed_t"]["kernel"]
                       + params["embed_t"]["bias"])
    key = jax.random.fold_in(state["key"], step)
    rows = negatives(key, labels, state, self.num_negatives)
    # Where the bank is small (CIFAR's 50,000 rows for 16,384 negatives), every row is
    # scored and each weighted by how often it was drawn: the same sums as over the
    # drawn rows, with no gather of B x K rows forward nor scatter of their gradients
    # backward (what made this term cost most of a student's step on a CPU).
    counts = (draw_counts(rows, n) if scores_whole_bank(n, self.num_negatives)
              else None)
    pos_s, neg_s = side_scores(state["memory_t"], f_s, index, rows, counts,
                               self.temperature)
    pos_t, neg_t = side_scores(state["memory_s"], f_t, index, rows, counts,
                               self.temperature)
    drawn = pos_s.shape[0] * (self.num_negatives + 1)

    def mean(pos, neg):  # over the B x (1 + K) drawn scores
      return (jnp.sum(pos) + jnp.sum(neg if counts is None else counts * neg)) / drawn

    z = jnp.where(state["z"] < 0, jax.lax.stop_gradient(
        jnp.stack([mean(pos_s, neg_s), mean(pos_t, neg_t)])) * n, state["z"])
    loss = (contrast_loss(pos_s / z[0], neg_s / z[0], n, self.num_negatives, counts)
            + contrast_loss(pos_t / z[1], neg_t / z[1], n, self.num_negatives, counts))
    f_s, f_t = jax.lax.stop_gradient(f_s), jax.lax.stop_gradient(f_t)
    new_state = {**state, "z": z,
                 "memory_s": update_bank(state["memory_s"], index, f_s, self.momentum),
                 "memory_t": update_bank(state["memory_t"], index, f_t, self.momentum)}
    return batch_loss(self.weight * loss, logits), new_state


def defaults() -> ml_collections.ConfigDict:
  """`config.crd`: RepDistiller's CIFAR setting."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map, pooled to the embedding.
      weight=0.8,
      embed_dim=128,  # the learned embeddings' and the bank's width.
      num_negatives=16384,  # RepDistiller's nce_k.
      temperature=0.07,  # RepDistiller's nce_t.
      momentum=0.5,  # the bank's (nce_m).
  ))


METHOD = Method(name="crd", section="crd", label="student with CRD", student_stage="crd",
                term=CRD, color="tab:olive", defaults=defaults,
                checks=(("embed_dim", COUNT), ("num_negatives", COUNT),
                        ("temperature", POSITIVE),
                        ("momentum", Range(0, 1, high_open=True))))
