"""FitNet (Romero et al., ICLR 2015), as the FSP paper's baseline runs it.

Stage 1 (`fitnet_hint`) regresses a student layer onto a teacher layer (the hint),
stage 2 (`fitnet`) trains the main task from those weights with Hinton KD added to the
cross-entropy (`fsp_jax.methods.kd`, `config.kd`: T = 3, weight 4 -> 1).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fsp_jax import config_lib
from fsp_jax import fsp as fsp_lib
from fsp_jax.methods.base import Method, Objective, Params, check_feature
from fsp_jax.methods.kd import KD
from fsp_jax.validation import COUNT, ConfigError

# The regressor ends in a ReLU (it must match the teacher's post-ReLU hint).
_relu_init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class Hint(Objective):
  """FitNet stage 1: regress a student layer onto a teacher layer.

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
  label = "FitNet hints"
  section = "fitnet"
  reads_features = True

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    """From `config.fitnet`; the features by name or index into `feature_names`."""
    del num_steps
    return cls(fsp_lib.resolve_name(section.hint_feature, feature_names,
                                    "fitnet.hint_feature"),
               fsp_lib.resolve_name(section.guided_feature, feature_names,
                                    "fitnet.guided_feature"),
               section.regressor_kernel, section.pool)

  def init(self, rng, teacher_features, student_features) -> Params:
    """`{'regressor': {'kernel': (k, k, C_guided, C_hint), 'bias': (C_hint,)}}`."""
    check_feature(self.hint_feature, teacher_features, "FitNet hint_feature")
    check_feature(self.guided_feature, student_features, "FitNet guided_feature")
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
    hint, regressed = fsp_lib.match_spatial(targets.astype(jnp.float32), regressed,
                                            self.pool)
    if hint.shape != regressed.shape:
      raise ConfigError(f"FitNet hint {hint.shape} and regressed guided layer "
                        f"{regressed.shape} differ in shape; pick other "
                        "fitnet.hint_feature / guided_feature layers.")
    return 0.5 * jnp.sum(jnp.square(jax.lax.stop_gradient(hint) - regressed),
                         axis=(1, 2, 3))


def defaults() -> ml_collections.ConfigDict:
  """`config.fitnet`: stage 1's hint and guided layers, regressor and schedule."""
  return ml_collections.ConfigDict(dict(
      hint_feature="section2",  # the teacher's feature (name or index): the middle.
      guided_feature="section2",  # the student's feature.
      regressor_kernel=1,  # the regressor convolution's kernel size.
      pool="max",  # where hint and guided maps differ in spatial size.
      # The paper's FitNet baseline: 35k iterations, LR 1e-4, 1e-5 after 25k.
      schedule=config_lib.schedule(35000, (1e-4, 1e-5), (25000,)),
  ))


def smoke(section) -> None:
  section.schedule = config_lib.schedule(8, (1e-4,), (), batch_size=32,
                                         augment=section.schedule.augment)


METHOD = Method(
    name="fitnet", section="fitnet", label="FitNet student (stage 2, KD)",
    student_stage="fitnet", stage_one=Hint, stage_one_name="fitnet_hint", term=KD,
    color="tab:orange", defaults=defaults, smoke=smoke,
    checks=(("regressor_kernel", COUNT), ("pool", ("max", "avg"))))
