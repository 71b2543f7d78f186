"""Flax (Linen) ResNets that return `(logits, features)`, and `Network`: a model with its
input normalisation, what the training steps apply.

`features` are the section boundaries FSP needs, by name: `{'stem': ..., 'section1':
..., ..., 'sectionK': ...}`, each channels-last `(B, H, W, C)` and taken after the ReLU
(`ResNet.feature_names` gives their order). Two families:

- CIFAR ResNets as in the paper: stem BN-conv-BN-ReLU, 3 sections of `n` modules
  (conv-BN-ReLU-conv-BN, add, ReLU), widths 16/32/64 times a multiplier, depth 6n+2.
- ImageNet-style basic-block ResNets: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool, 4 sections
  of widths 64/128/256/512 (ResNet-18, ResNet-34, the paper's 2/2/3/2 transfer student).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsp_jax import layers

ModuleDef = Any
# MSRA initialisation (He et al.), as the paper states; fan_out as in torchvision.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualModule(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, add the (projected) input, ReLU. `(B,H,W,C)` in/out."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  padding: Any = "SAME"

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides),
                  padding=self.padding, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=self.padding, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if residual.shape != y.shape:
      # Projection shortcut (1x1 conv + BN) where width or resolution changes.
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                           name="shortcut_conv")(residual)
      residual = self.norm(name="shortcut_bn")(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A ResNet cut into sections of constant spatial size.

  Attributes:
    modules_per_section: residual modules in each section, e.g. (4, 4, 4).
    widths: channels of each section, e.g. (16, 32, 64).
    num_classes: size of the classifier output.
    stem: "cifar" (BN-conv3x3-BN-ReLU) or "imagenet" (conv7x7/2-BN-ReLU-maxpool3x3/2).
    dtype: computation dtype (float32, or bfloat16 for mixed precision); parameters
      stay float32.
    conv_padding: padding of the 3x3 convolutions in residual modules. "SAME" pads a
      stride-2 convolution of an even-sized map by (0, 1); 1 pads (1, 1) as PyTorch
      does, which torchvision weights need (the ImageNet family uses it).
  """
  modules_per_section: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  stem: str = "cifar"
  dtype: Any = jnp.float32
  conv_padding: Any = "SAME"

  @property
  def feature_names(self) -> Tuple[str, ...]:
    """The keys of the features, in network order: `('stem', 'section1', ...)`."""
    return ("stem",) + tuple(f"section{k + 1}" for k in range(len(self.widths)))

  @nn.compact
  def __call__(self, x, train: bool = True) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Args: x `(B, H, W, C)` normalised images. Returns logits `(B, num_classes)` and
    features `{'stem': ..., 'section1': ..., ...}`, each `(B, H_k, W_k, C_k)`."""
    if len(self.modules_per_section) != len(self.widths):
      raise ValueError(
          f"modules_per_section {tuple(self.modules_per_section)} and widths "
          f"{tuple(self.widths)} must have one entry per section.")
    # fsp_jax.layers: lax's convolution and Flax's BatchNorm, with backward passes
    # that XLA:CPU runs faster (same values and gradients).
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=conv_init,
                             conv_general_dilated=layers.conv_general_dilated)
    # Momentum 0.9 and eps 1e-5 are PyTorch's BatchNorm defaults (momentum 0.1 there).
    norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      x = norm(name="bn_input")(x)
      x = conv(self.widths[0], (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    elif self.stem == "imagenet":
      x = conv(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    else:
      raise ValueError(f"stem={self.stem!r} is unknown; use 'cifar' or 'imagenet'.")
    features = {"stem": x}
    for s, (n, width) in enumerate(zip(self.modules_per_section, self.widths)):
      for m in range(n):
        strides = 2 if (s > 0 and m == 0) else 1
        x = ResidualModule(width, strides, conv=conv, norm=norm,
                           padding=self.conv_padding,
                           name=f"section{s + 1}_module{m + 1}")(x)
      features[f"section{s + 1}"] = x
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled)
    return logits.astype(jnp.float32), features


def cifar_resnet(depth: int, width_multiplier: int = 1, **kwargs) -> ResNet:
  """The paper's CIFAR ResNet of depth 6n+2, widths (16, 32, 64) * width_multiplier."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, "
                     f"56, 110, ...); got {depth}.")
  n = (depth - 2) // 6
  widths = tuple(w * width_multiplier for w in (16, 32, 64))
  return ResNet(modules_per_section=(n, n, n), widths=widths, stem="cifar", **kwargs)


def imagenet_resnet(modules_per_section: Sequence[int], width_multiplier: int = 1,
                    **kwargs) -> ResNet:
  """A basic-block ImageNet ResNet with 4 sections of widths (64, 128, 256, 512).

  Laid out as torchvision's `resnet18`/`resnet34` (PyTorch padding included), so
  `fsp_jax.convert_torchvision` weights give the same outputs.
  """
  widths = tuple(w * width_multiplier for w in (64, 128, 256, 512))
  return ResNet(modules_per_section=tuple(modules_per_section), widths=widths,
                stem="imagenet", conv_padding=1, **kwargs)


MODELS: Dict[str, Callable[..., ResNet]] = {
    **{f"cifar_resnet{d}": functools.partial(cifar_resnet, d)
       for d in (8, 14, 20, 26, 32, 44, 56, 110)},
    "resnet18": functools.partial(imagenet_resnet, (2, 2, 2, 2)),
    "resnet34": functools.partial(imagenet_resnet, (3, 4, 6, 3)),
    # The paper's transfer-learning student ("ResNet-20" with 2/2/3/2 modules).
    "resnet20_transfer": functools.partial(imagenet_resnet, (2, 2, 3, 2)),
}


def create_model(name: str, num_classes: int, width_multiplier: int = 1,
                 dtype: Any = jnp.float32) -> ResNet:
  """Builds a model from its preset name (see `MODELS`)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
  return MODELS[name](width_multiplier=width_multiplier, num_classes=num_classes,
                      dtype=dtype)


def init_variables(module: nn.Module, rng: jax.Array, image_shape) -> Dict[str, Any]:
  """Initial `{'params', 'batch_stats'}` of `module` for images `(H, W, C)`."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = module.init(rng, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


@dataclasses.dataclass(frozen=True)
class Network:
  """A model as the training steps use it: the Flax module and its input normalisation.

  Images enter as uint8 `(B, H, W, C)`; `apply` standardises them per channel with
  `mean` and `std` (the training set's, 0-255 scale) before the module sees them, the
  one place where inputs are normalised. Hashable, so jitted steps are built once per
  network.

  Attributes:
    module: a Linen module `(x, train) -> (logits (B, K), features)`.
    mean, std: per-channel statistics `(C,)` as tuples of floats.
  """
  module: nn.Module
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  @property
  def num_classes(self) -> int:
    return self.module.num_classes

  @property
  def feature_names(self) -> Tuple[str, ...]:
    return self.module.feature_names

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 `(B, H, W, C)` -> float32 standardised per channel."""
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std

  def init(self, rng: jax.Array, image_shape) -> Dict[str, Any]:
    """Initial `{'params', 'batch_stats'}` for images `(H, W, C)`."""
    return init_variables(self.module, rng, image_shape)

  def apply(self, variables, images: jax.Array, train: bool = False):
    """`(logits, features)`; in training mode (batch statistics of this batch)
    `((logits, features), new_batch_stats)`."""
    x = self.normalize(images)
    if not train:
      return self.module.apply(variables, x, train=False)
    out, updates = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]
