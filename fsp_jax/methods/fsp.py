"""FSP (Yim et al., CVPR 2017): the paper's two stages.

Stage 1 trains the student on the FSP loss alone (Eq. 2),

    L_FSP = 1/N sum_x sum_i lambda_i || G_i^T(x) - G_i^S(x) ||_F^2,

with `G_i = fsp_jax.fsp.fsp_matrix` of the first and last feature map of section i;
stage 2 (`student`) trains the main task from those weights, cross-entropy alone.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import config_lib
from fsp_jax import fsp as fsp_lib
from fsp_jax.methods.base import Method, Objective, Params, check_feature
from fsp_jax.validation import ConfigError

# Linear maps of post-ReLU features: unit gain, so adapted maps keep the input's scale.
_linear_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class FSP(Objective):
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
  label = "FSP"
  section = "fsp"
  reads_features = True

  def __post_init__(self):
    if self.reduction not in fsp_lib.REDUCTIONS:
      raise ConfigError(f"fsp.reduction={self.reduction!r} is not one of "
                        f"{fsp_lib.REDUCTIONS}: 'sum' is the paper's Eq. 2, 'mean' the "
                        "re-implementations' scale.")
    if self.weights is not None and len(self.weights) != len(self.fsp_pairs):
      raise ConfigError(f"{len(self.weights)} FSP pair weights (fsp.weights) given for "
                        f"{len(self.fsp_pairs)} fsp_pairs; give one weight per pair.")

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    """From `config.fsp`; `fsp_pairs` may name features or index `feature_names`
    (() = one pair per section)."""
    del num_steps
    pairs = (fsp_lib.resolve_pairs(section.fsp_pairs, feature_names,
                                   "fsp.fsp_pairs entry")
             if section.fsp_pairs else fsp_lib.default_fsp_pairs(feature_names))
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
      check_feature(name, teacher_features, "FSP feature")
      check_feature(name, student_features, "FSP feature")
      c_s, c_t = student_features[name].shape[-1], teacher_features[name].shape[-1]
      params[f"adapter_{name}"] = {"kernel": _linear_init(jax.random.fold_in(rng, k),
                                                          (c_s, c_t), jnp.float32)}
    return params

  def teacher_targets(self, logits, features) -> Tuple[jax.Array, ...]:
    """The teacher's FSP matrices, one `(B, m, n)` per pair."""
    del logits
    return fsp_lib.fsp_matrices(features, self.fsp_pairs, self.pool)

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
    student = fsp_lib.fsp_matrices(self.adapt(params, features), self.fsp_pairs,
                                   self.pool)
    return fsp_lib.fsp_distances(targets, student, self.weights, self.reduction)


def defaults() -> ml_collections.ConfigDict:
  """`config.fsp`: stage 1's FSP loss and schedule (the paper's CIFAR-10 setting)."""
  return ml_collections.ConfigDict(dict(
      # (first, last) feature names, e.g. (('stem', 'section1'), ('section1',
      # 'section2')), or indices into the network's features; () = one per section.
      fsp_pairs=(),
      weights=(),  # lambda per pair; () = all 1.0 (the paper: all equal).
      pool="max",  # spatial mismatch: 'max' (paper) or 'avg'.
      # 'sum' of squared differences over each matrix's entries (Eq. 2, the paper) or
      # their 'mean' (PyTorch re-implementations; use LR ~0.05 with it). With 'sum',
      # LR 1e-3 is at the edge of stability on CIFAR (docs/reproduction/weak_teacher/findings.md).
      reduction="sum",
      # Beyond the paper: learned 1x1 convolutions map the student's feature maps to
      # the teacher's channel counts, so teachers of other widths can be used.
      adapter=False,
      schedule=config_lib.schedule(21000, (0.001, 0.0001, 0.00001), (11000, 16000)),
      # A finished stage 1 to reuse (a stage directory, e.g. OTHER_WORKDIR/fsp): one
      # stage-1 result initialises several students, as in the paper's Table 1.
      checkpoint="",
      # Compute the frozen teacher's FSP matrices once per training example and reuse
      # them every epoch (the paper's suggestion): stage 1 then costs about one student
      # step. Needs un-augmented stage-1 inputs (fsp.schedule.augment=False, the
      # CIFAR-100 setting). Host memory: 4 bytes x sum(m*n) per example, e.g. CIFAR-100
      # at 4x width: (64*64 + 64*128 + 128*256) * 4 B = 176 KiB x 50,000 = 9.0 GB.
      cache_teacher=False,
      # With num_seeds > 1: True trains one stage 1 (seed `seed`) and starts every
      # seed's stage 2 from it, as the paper's Algorithm 1 and Table 1 do (the
      # spread then excludes stage-1 variance); False gives each seed its own.
      shared=False,
  ))


def smoke(section) -> None:
  section.checkpoint = ""
  section.schedule = config_lib.schedule(8, (1e-3,), (), batch_size=32,
                                         augment=section.schedule.augment)


METHOD = Method(
    name="fsp", section="fsp", label="FSP student (stage 2)", student_stage="student",
    stage_one=FSP, stage_one_name="fsp", color="tab:red", defaults=defaults,
    smoke=smoke, checks=(("pool", ("max", "avg")), ("reduction", fsp_lib.REDUCTIONS)))
