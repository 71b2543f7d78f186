"""Distillation methods as pluggable objectives: FSP, FitNet hints, Hinton KD.

Each method is one small frozen dataclass that says what it needs from the frozen
teacher and gives one per-example objective; `train.train_step` runs any of them the
same way and never asks which one it runs:

- `teacher_targets(logits, features)`: what the method takes from the teacher's outputs
  (FSP matrices, a hint feature map, logits). Computed in inference mode, no gradient.
- `init(rng, teacher_features, student_features)`: the method's own learned parameters
  (a FitNet regressor, FSP channel adapters), `{}` when it has none. They are trained
  with the student by the same optimizer and saved apart from the student's weights,
  so the next stage restores the student alone.
- `objective(params, targets, logits, features, step)`: the loss of each example `(B,)`
  from the student's outputs (train mode); the trainer averages it over the batch and
  adds the main-task cross-entropy where the stage uses labels.

`logits` are `(B, K)`; `features` are the models' named feature maps
`{'stem': ..., 'section1': ..., ...}`, each channels-last `(B, H, W, C)`
(ShapeDtypeStructs are enough for `init`). Each method names the features it uses.

`DISTILLERS` maps a method's name to its class; `build(name, config, feature_names)`
makes one from its config section (`config.fsp`, `config.fitnet`, `config.kd`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from fsp_jax import fsp
from fsp_jax.validation import ConfigError

Params = Dict[str, Any]
# Linear maps of post-ReLU features: unit gain, so adapted maps keep the input's scale.
_linear_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
# The FitNet regressor ends in a ReLU (it must match the teacher's post-ReLU hint).
_relu_init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _check_feature(name: str, features, what: str) -> None:
  if name not in features:
    raise ConfigError(f"{what} {name!r} is not a feature of the network; its features "
                     f"are {tuple(sorted(features))}.")


@dataclasses.dataclass(frozen=True)
class FSP:
  """The paper's stage-1 objective (Eq. 2): match the teacher's FSP matrices.

  Attributes:
    fsp_pairs: `(first, last)` feature names, one pair per FSP matrix, e.g.
      `(('stem', 'section1'), ('section1', 'section2'), ('section2', 'section3'))`.
    weights: lambda_i per pair; None = all 1.0 (the paper).
    pool: "max" (paper) or "avg" for pairs of different spatial size.
    adapter: beyond the paper, for teachers and students of different widths: a learned
      bias-free 1x1 convolution maps each student feature map used by a pair to the
      teacher's channel count before its FSP matrix is taken (so the student's matrix
      becomes A_i^T G^S A_j). Off by default: the paper's setting stays exact.
    reduction: "sum" over each matrix's entries (Eq. 2, the paper) or "mean" (the
      re-implementations' scale, 1/(m n) of it: learning rates do not transfer).
  """
  fsp_pairs: Tuple[Tuple[str, str], ...]
  weights: Optional[Tuple[float, ...]] = None
  pool: str = "max"
  adapter: bool = False
  reduction: str = "sum"
  name = "fsp"
  config_section = "fsp"

  def __post_init__(self):
    if self.reduction not in fsp.REDUCTIONS:
      raise ConfigError(f"fsp.reduction={self.reduction!r} is not one of "
                       f"{fsp.REDUCTIONS}: 'sum' is the paper's Eq. 2, 'mean' the "
                       "re-implementations' scale.")
    if self.weights is not None and len(self.weights) != len(self.fsp_pairs):
      raise ConfigError(f"{len(self.weights)} FSP pair weights (fsp.weights) given for "
                       f"{len(self.fsp_pairs)} fsp_pairs; give one weight per pair.")

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str], num_steps: int = 1):
    """From `config.fsp`; `fsp_pairs` may name features or index `feature_names`
    (() = one pair per section)."""
    del num_steps
    pairs = (fsp.resolve_pairs(section.fsp_pairs, feature_names, "fsp.fsp_pairs entry")
             if section.fsp_pairs else fsp.default_fsp_pairs(feature_names))
    return cls(pairs, tuple(section.weights) or None, section.pool,
               adapter=section.adapter, reduction=section.reduction)

  def _names(self) -> Tuple[str, ...]:
    return tuple(sorted({k for pair in self.fsp_pairs for k in pair}))

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{}`; with `adapter`, `{'adapter_<name>': {'kernel': (C_student, C_teacher)}}`
    for each feature a pair uses."""
    if not self.adapter:
      return {}
    params = {}
    for k, name in enumerate(self._names()):
      _check_feature(name, teacher_features, "FSP feature")
      _check_feature(name, student_features, "FSP feature")
      c_s, c_t = student_features[name].shape[-1], teacher_features[name].shape[-1]
      params[f"adapter_{name}"] = {"kernel": _linear_init(jax.random.fold_in(rng, k),
                                                          (c_s, c_t), jnp.float32)}
    return params

  def teacher_targets(self, logits, features) -> Tuple[jax.Array, ...]:
    """The teacher's FSP matrices, one `(B, m, n)` per pair."""
    del logits
    return fsp.fsp_matrices(features, self.fsp_pairs, self.pool)

  def adapt(self, params: Params, features) -> Dict[str, jax.Array]:
    """The student's feature maps in the teacher's channels (as they are without
    `adapter`)."""
    if not self.adapter:
      return features
    out = dict(features)
    for name in self._names():
      kernel = params[f"adapter_{name}"]["kernel"]
      out[name] = jnp.einsum("bhwc,cd->bhwd", features[name].astype(jnp.float32),
                             kernel, precision=jax.lax.Precision.HIGHEST)
    return out

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: sum_i lambda_i ||G_i^T - G_i^S||_F^2 of each example."""
    del logits, step
    student = fsp.fsp_matrices(self.adapt(params, features), self.fsp_pairs, self.pool)
    return fsp.fsp_distances(targets, student, self.weights, self.reduction)


@dataclasses.dataclass(frozen=True)
class Hint:
  """FitNet stage 1 (Romero et al. 2015): regress a student layer onto a teacher layer.

  L = 1/2 || u_h - ReLU(r(v_g)) ||^2 per example, summed over `(H, W, C)`: `u_h` the
  teacher's hint feature map, `v_g` the student's guided one, `r` a learned convolution
  (the regressor) to the hint's channel count; ReLU because the hint is post-ReLU (the
  FitNet paper requires the same non-linearity on both sides). Where the two maps differ
  in spatial size, the larger is pooled down (`pool`), as for FSP.

  Attributes:
    hint_feature: the teacher's feature ('section2', the end of section 2: the middle
      of a 3-section CIFAR ResNet).
    guided_feature: the student's feature.
    regressor_kernel: the regressor's kernel size (1 = a 1x1 convolution).
    pool: "max" or "avg".
  """
  hint_feature: str = "section2"
  guided_feature: str = "section2"
  regressor_kernel: int = 1
  pool: str = "max"
  name = "hint"
  config_section = "fitnet"

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str], num_steps: int = 1):
    """From `config.fitnet`; the features by name or index into `feature_names`."""
    del num_steps
    return cls(fsp.resolve_name(section.hint_feature, feature_names,
                                "fitnet.hint_feature"),
               fsp.resolve_name(section.guided_feature, feature_names,
                                "fitnet.guided_feature"),
               section.regressor_kernel, section.pool)

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'regressor': {'kernel': (k, k, C_guided, C_hint), 'bias': (C_hint,)}}`."""
    _check_feature(self.hint_feature, teacher_features, "FitNet hint_feature")
    _check_feature(self.guided_feature, student_features, "FitNet guided_feature")
    c_s = student_features[self.guided_feature].shape[-1]
    c_t = teacher_features[self.hint_feature].shape[-1]
    k = self.regressor_kernel
    return {"regressor": {"kernel": _relu_init(rng, (k, k, c_s, c_t), jnp.float32),
                          "bias": jnp.zeros((c_t,), jnp.float32)}}

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's hint feature map `(B, H, W, C_hint)`."""
    del logits
    return features[self.hint_feature]

  def regress(self, params: Params, guided: jax.Array) -> jax.Array:
    """ReLU(r(v_g)): `(B, H, W, C_guided)` -> `(B, H, W, C_hint)`, float32."""
    reg = params["regressor"]
    y = jax.lax.conv_general_dilated(
        guided.astype(jnp.float32), reg["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y + reg["bias"])

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: 1/2 ||hint - ReLU(r(guided))||^2 of each example."""
    del logits, step
    regressed = self.regress(params, features[self.guided_feature])
    hint, regressed = fsp.match_spatial(targets.astype(jnp.float32), regressed, self.pool)
    if hint.shape != regressed.shape:
      raise ConfigError(f"FitNet hint {hint.shape} and regressed guided layer "
                       f"{regressed.shape} differ in shape; pick other fitnet.hint_feature / guided_feature layers.")
    return 0.5 * jnp.sum(jnp.square(jax.lax.stop_gradient(hint) - regressed),
                         axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class KD:
  """Hinton et al. (2015) knowledge distillation: softened teacher logits.

  weight(step) * [T^2] * KL(softmax(z_t / T) || softmax(z_s / T)) per example, a term
  added to the main-task cross-entropy (the trainer adds the latter). KL has the
  gradients of the FitNet paper's cross-entropy H(P_t^T, P_s^T) and is 0 at a match.

  Attributes:
    temperature: T (the paper's FitNet stage 2: 3).
    weight: the term's weight at step 0.
    final_weight: where given, the weight moves linearly from `weight` at step 0 to
      this at step `num_steps - 1` (the paper's FitNet stage 2: 4 -> 1).
    num_steps: the stage's length, for the linear schedule.
    scale_by_t_squared: multiply by T^2 as Hinton et al. do to keep gradient scale;
      off by default (the FitNet formula).
  """
  temperature: float = 3.0
  weight: float = 1.0
  final_weight: Optional[float] = None
  num_steps: int = 1
  scale_by_t_squared: bool = False
  name = "kd"
  config_section = "kd"

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    """From `config.kd`, for a stage of `num_steps` (the weight's linear schedule)."""
    del feature_names
    return cls(section.temperature, section.weight, section.final_weight, num_steps,
               section.scale_by_t_squared)

  def init(self, rng, teacher_features, student_features) -> Params:
    del rng, teacher_features, student_features
    return {}

  def teacher_targets(self, logits, features) -> jax.Array:
    """The teacher's logits `(B, K)`."""
    del features
    return logits

  def weight_at(self, step) -> jax.Array:
    if self.final_weight is None:
      return jnp.asarray(self.weight, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(self.num_steps - 1, 1), 1.0)
    return self.weight + (self.final_weight - self.weight) * frac

  def objective(self, params: Params, targets, logits, features, step) -> jax.Array:
    """`(B,)`: the weighted KL divergence of each example."""
    del params, features
    if targets.shape != logits.shape:
      raise ConfigError(f"KD needs teacher and student logits of one shape; got teacher "
                       f"{targets.shape} and student {logits.shape}: the two must "
                       "classify the same classes.")
    t = self.temperature
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(targets).astype(jnp.float32) / t)
    log_p_s = jax.nn.log_softmax(logits.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    scale = t * t if self.scale_by_t_squared else 1.0
    return self.weight_at(step) * scale * kl


DISTILLERS = {"fsp": FSP, "hint": Hint, "kd": KD}


def build(name: str, config, feature_names: Sequence[str] = (), num_steps: int = 1):
  """The method `name` of `DISTILLERS`, from its section of `config`.

  Args:
    config: the experiment config (its `fsp`, `fitnet` or `kd` section is read).
    feature_names: the student's features in network order, for fields given as
      indices.
    num_steps: the stage's length (KD's weight schedule).
  """
  if name not in DISTILLERS:
    raise ConfigError(f"unknown distiller {name!r}; choose from {sorted(DISTILLERS)}.")
  cls = DISTILLERS[name]
  return cls.from_config(config[cls.config_section], feature_names, num_steps)
