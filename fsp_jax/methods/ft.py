"""FT: factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network"), as
RepDistiller runs it: a paraphraser stage, then the main task.

Stage 1 (`ft_paraphraser`) trains a paraphraser on the frozen teacher alone (the
student does not move): a convolutional autoencoder of the teacher's last feature map
`t` `(B, H, W, C_t)`, whose encoder gives the teacher's factor, `C_f = int(C_t * rate)`
channels (rate 0.5), trained to reconstruct `t`:

    L_rec = mean_{b,h,w,c} (dec(enc(t)) - t)^2

(encoder: three 3x3 convolutions C_t -> C_t -> C_f -> C_f, decoder: three 3x3
(transposed) convolutions C_f -> C_f -> C_t -> C_t, each followed by a leaky ReLU of
slope 0.1, no normalisation). The main-task stage (`ft`) trains the student from random
weights with a translator, three 3x3 convolutions C_s -> C_s -> C_f -> C_f on the
student's last map `s`, each followed by a normalisation over the batch and a leaky
ReLU, that gives the student's factor; with the paraphraser frozen,

    L_FT = mean_{b,p} | n(f(translator(s)))_{b,p} - n(f(enc(t)))_{b,p} |,
    f(F)_{b,p} = mean_c F_{b,p,c}^2,  n(x) = x / max(||x||_2, 1e-12) per example,

added to the cross-entropy with weight 200 (RepDistiller's `FactorTransfer` with p1 = 2,
p2 = 1 and `-b 200`; the paper's factor is F itself normalised, RepDistiller's the
normalised channel mean of its squares, which is what its weight of 200 goes with).
Where the two factors differ in spatial size the larger is average-pooled to the
smaller. The translator's normalisation uses the batch's statistics (RepDistiller's
BatchNorm keeps running ones for its evaluation only, and the translator never serves
the student's predictions). Convolutions are initialised as PyTorch does (weights and
biases uniform in +-1/sqrt(fan_in)); a 3x3 stride-1 transposed convolution with
padding 1 is a convolution with 'SAME' padding, learned alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import config_lib, losses
from fsp_jax.methods import ab
from fsp_jax.methods.base import (Method, Objective, Params, batch_loss, check_feature,
                                  resolve_layers)
from fsp_jax.validation import POSITIVE, ConfigError


def conv3x3_init(rng, c_in: int, c_out: int, fan_in: int) -> Params:
  """A 3x3 convolution `{'kernel': (3, 3, c_in, c_out), 'bias': (c_out,)}`, uniform
  in +-1/sqrt(fan_in) (PyTorch's initialisation)."""
  bound = 1.0 / math.sqrt(fan_in)
  k_w, k_b = jax.random.split(rng)
  return {"kernel": jax.random.uniform(k_w, (3, 3, c_in, c_out), jnp.float32, -bound,
                                       bound),
          "bias": jax.random.uniform(k_b, (c_out,), jnp.float32, -bound, bound)}


def conv3x3(p: Params, x: jax.Array) -> jax.Array:
  """`(B, H, W, C_in)` -> `(B, H, W, C_out)`, 'SAME' padding, float32."""
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"]


def leaky_relu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, 0.1)


def batch_norm(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Normalised over the batch and positions per channel, then `scale`, `bias`."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.var(x, axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def factor_channels(c_t: int, rate: float) -> int:
  """The factor's channel count, int(C_t * rate) (RepDistiller's k)."""
  c_f = int(c_t * rate)
  if c_f < 1:
    raise ConfigError(f"ft.rate={rate} leaves no factor channels of the teacher's "
                      f"{c_t}: raise it.")
  return c_f


def paraphraser_init(rng, c_t: int, c_f: int) -> Params:
  """The teacher's autoencoder: `encoder` and `decoder`, three convolutions each."""
  ks = jax.random.split(rng, 6)
  enc = [(c_t, c_t), (c_t, c_f), (c_f, c_f)]
  dec = [(c_f, c_f), (c_f, c_t), (c_t, c_t)]
  # A transposed convolution's fan-in (PyTorch) is its output channels x 3 x 3.
  return {"encoder": [conv3x3_init(k, i, o, i * 9) for k, (i, o) in zip(ks[:3], enc)],
          "decoder": [conv3x3_init(k, i, o, o * 9) for k, (i, o) in zip(ks[3:], dec)]}


def encode(paraphraser: Params, t: jax.Array) -> jax.Array:
  """The teacher's factor `(B, H, W, C_f)` of its map `(B, H, W, C_t)`."""
  x = t.astype(jnp.float32)
  for p in paraphraser["encoder"]:
    x = leaky_relu(conv3x3(p, x))
  return x


def decode(paraphraser: Params, factor: jax.Array) -> jax.Array:
  x = factor
  for p in paraphraser["decoder"]:
    x = leaky_relu(conv3x3(p, x))
  return x


def translate(translator: Params, s: jax.Array) -> jax.Array:
  """The student's factor `(B, H, W, C_f)` of its map `(B, H, W, C_s)`."""
  x = s.astype(jnp.float32)
  for conv, norm in zip(translator["convs"], translator["norms"]):
    x = leaky_relu(batch_norm(norm, conv3x3(conv, x)))
  return x


def factor_attention(factor: jax.Array) -> jax.Array:
  """`(B, H*W)`: the channel mean of the factor's squares, L2-normalised per example."""
  a = jnp.mean(jnp.square(factor), axis=-1).reshape(factor.shape[0], -1)
  return a / jnp.maximum(jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)), 1e-12)


def _layer(section, feature_names, field):
  return resolve_layers(section.layers, feature_names, lambda names: names[-1:],
                        field)[-1:]


@dataclasses.dataclass(frozen=True)
class Paraphrase(Objective):
  """FT's stage 1: the paraphraser reconstructs the teacher's map (the student rests).

  Attributes:
    layers: the one teacher feature it reads (the last map).
    rate: the factor's channels over the teacher's (0.5).
  """
  layers: Tuple[str, ...]
  rate: float = 0.5
  name = "paraphrase"
  label = "FT paraphraser"
  section = "ft"
  reads_features = True
  trains_student = False

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    return cls(_layer(section, feature_names, "ft.layers"), section.rate)

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'paraphraser': {'encoder': [3 convs], 'decoder': [3 convs]}}`."""
    del student_features
    (layer,) = self.layers
    check_feature(layer, teacher_features, "FT layer")
    c_t = teacher_features[layer].shape[-1]
    return {"paraphraser": paraphraser_init(rng, c_t, factor_channels(c_t, self.rate))}

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's map `(B, H, W, C_t)`."""
    del logits
    return features[self.layers[0]]

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: each example's mean squared reconstruction error."""
    del logits, features, step
    t = jax.lax.stop_gradient(targets).astype(jnp.float32)
    p = params["paraphraser"]
    rec = decode(p, encode(p, t))
    return jnp.mean(jnp.square(rec - t), axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class FT(Objective):
  """FT's main-task term: the student's translated factor matches the teacher's
  paraphrased one (the paraphraser from stage 1, frozen).

  Attributes:
    layers: the one feature read, student and teacher alike (the last map).
    weight: the term's weight (200).
    rate: the factor's channels over the teacher's (0.5).
  """
  layers: Tuple[str, ...]
  weight: float = 200.0
  rate: float = 0.5
  name = "ft"
  label = "FT"
  section = "ft"
  reads_features = True
  frozen_params = ("paraphraser",)

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    return cls(_layer(section, feature_names, "ft.layers"), section.weight,
               section.rate)

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'translator': {'convs': [3], 'norms': [3]}, 'paraphraser': ...}` (the
    paraphraser replaced by stage 1's, `from_stage_one`)."""
    (layer,) = self.layers
    check_feature(layer, teacher_features, "FT layer")
    check_feature(layer, student_features, "FT layer")
    c_t = teacher_features[layer].shape[-1]
    c_s = student_features[layer].shape[-1]
    c_f = factor_channels(c_t, self.rate)
    k_p, *ks = jax.random.split(rng, 4)
    shapes = [(c_s, c_s), (c_s, c_f), (c_f, c_f)]
    return {"translator": {
        "convs": [conv3x3_init(k, i, o, i * 9) for k, (i, o) in zip(ks, shapes)],
        "norms": [{"scale": jnp.ones((o,), jnp.float32),
                   "bias": jnp.zeros((o,), jnp.float32)} for _, o in shapes]},
            "paraphraser": paraphraser_init(k_p, c_t, c_f)}

  def from_stage_one(self, params: Params, stage_one_params: Params) -> Params:
    return {**params, "paraphraser": stage_one_params["paraphraser"]}

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's map `(B, H, W, C_t)` (paraphrased in `objective`)."""
    del logits
    return features[self.layers[0]]

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: weight x the batch's L_FT, for every example."""
    del step
    paraphraser = jax.lax.stop_gradient(params["paraphraser"])
    factor_t = encode(paraphraser, jax.lax.stop_gradient(targets))
    factor_s = translate(params["translator"], features[self.layers[0]])
    factor_s, factor_t = losses.match_spatial(factor_s, factor_t, "FT factor")
    loss = jnp.mean(jnp.abs(factor_attention(factor_s) - factor_attention(factor_t)))
    return batch_loss(self.weight * loss, logits)


def defaults() -> ml_collections.ConfigDict:
  """`config.ft`: RepDistiller's CIFAR setting."""
  return ml_collections.ConfigDict(dict(
      layers=(),  # () = the last feature map.
      weight=200.0,
      rate=0.5,  # the factor's channels over the teacher's (RepDistiller's k).
      # RepDistiller: the paraphraser trains 30 epochs at LR 0.05 before the main task.
      schedule=config_lib.schedule(8000, (0.05,), ()),
      checkpoint="",  # A finished stage 1 to reuse (its stage directory).
  ))


METHOD = Method(name="ft", section="ft", label="student with FT", student_stage="ft",
                stage_one=Paraphrase, stage_one_name="ft_paraphraser", term=FT,
                color="tab:brown", defaults=defaults, smoke=ab.smoke,
                student_from_stage_one=False, params_from_stage_one=True,
                checks=(("rate", POSITIVE),))
