"""Flax (Linen) ResNets that return `(logits, features)`, and `Network`: a model with its
input normalisation, what the training steps apply. `Network` also wraps models of your
own, Linen or NNX (`NnxModel`), given by import path, their features taken by layer
path (`fsp_jax.capture`; docs/own_models.md).

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
from flax import nnx

from fsp_jax import capture, fsp, layers
from fsp_jax.validation import ConfigError

ModuleDef = Any
# MSRA initialisation (He et al.), as the paper states; fan_out as in torchvision.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualModule(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, add the (projected) input, ReLU. `(B,H,W,C)` in/out."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  padding: Any = 1

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


class Feature(nn.Module):
  """The identity, named: marks a feature map as a layer of its own, so that
  `capture_features(model, v, x, ('stem', 'section1'))` takes a ResNet's built-in
  features by path. No parameters: variables and outputs are as without it."""

  @nn.compact
  def __call__(self, x):
    return x


class ResNet(nn.Module):
  """A ResNet cut into sections of constant spatial size.

  Attributes:
    modules_per_section: residual modules in each section, e.g. (4, 4, 4).
    widths: channels of each section, e.g. (16, 32, 64).
    num_classes: size of the classifier output.
    stem: "cifar" (BN-conv3x3-BN-ReLU) or "imagenet" (conv7x7/2-BN-ReLU-maxpool3x3/2).
    dtype: computation dtype (float32, or bfloat16 for mixed precision); parameters
      stay float32.
    conv_padding: padding of the 3x3 convolutions in residual modules: 1 pads (1, 1)
      as Caffe and PyTorch do, so a stride-2 convolution's output at (i, j) is
      centred on input pixel (2i, 2j), the pixel the 1x1 stride-2 shortcut samples
      (torchvision weights need it too). "SAME" would pad an even-sized map by (0, 1)
      at stride 2, centring the output one pixel off the shortcut.

  Shortcuts are identities, or 1x1 projections (convolution + BN) where width or
  resolution changes (the paper does not say which; RepDistiller does the same).
  """
  modules_per_section: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  stem: str = "cifar"
  dtype: Any = jnp.float32
  conv_padding: Any = 1

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
    x = Feature(name="stem")(x)
    features = {"stem": x}
    for s, (n, width) in enumerate(zip(self.modules_per_section, self.widths)):
      for m in range(n):
        strides = 2 if (s > 0 and m == 0) else 1
        x = ResidualModule(width, strides, conv=conv, norm=norm,
                           padding=self.conv_padding,
                           name=f"section{s + 1}_module{m + 1}")(x)
      x = Feature(name=f"section{s + 1}")(x)
      features[f"section{s + 1}"] = x
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled)
    return logits.astype(jnp.float32), features


def cifar_resnet(depth: int, width_multiplier: int = 1, **kwargs) -> ResNet:
  """The paper's CIFAR ResNet of depth 6n+2, widths (16, 32, 64) * width_multiplier."""
  if depth < 8 or (depth - 2) % 6:
    raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, "
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
                stem="imagenet", **kwargs)


MODELS: Dict[str, Callable[..., ResNet]] = {
    **{f"cifar_resnet{d}": functools.partial(cifar_resnet, d)
       for d in (8, 14, 20, 26, 32, 44, 56, 110)},
    "resnet18": functools.partial(imagenet_resnet, (2, 2, 2, 2)),
    "resnet34": functools.partial(imagenet_resnet, (3, 4, 6, 3)),
    # The paper's transfer-learning student ("ResNet-20" with 2/2/3/2 modules).
    "resnet20_transfer": functools.partial(imagenet_resnet, (2, 2, 3, 2)),
}


def is_import_path(name: str) -> bool:
  """Whether a model name is an import path `PKG.MODULE:NAME` (not a preset)."""
  return ":" in str(name)


def create_model(name: str, num_classes: int, width_multiplier: int = 1,
                 dtype: Any = jnp.float32):
  """Builds a model from its preset name (see `MODELS`) or its import path.

  An import path `PKG.MODULE:NAME` names a Linen module class or factory, called as
  `NAME(num_classes=num_classes)`, or an NNX module class (or a factory with an `rngs`
  parameter), called as `NAME(num_classes=num_classes, rngs=nnx.Rngs(rng))` and
  returned wrapped in an `NnxModel`. `dtype` and `width_multiplier` apply to presets
  only (a model of your own computes in its own dtype).
  """
  if is_import_path(name):
    if width_multiplier != 1:
      raise ConfigError(f"width_multiplier={width_multiplier} applies to the package's "
                       f"presets only, not to the import-path model {name!r}; set it to "
                       "1 and give your model its widths.")
    return model_from_import_path(name, num_classes)
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}, or give "
                     "a model of your own by import path, PKG.MODULE:NAME.")
  return MODELS[name](width_multiplier=width_multiplier, num_classes=num_classes,
                      dtype=dtype)


def model_from_import_path(path: str, num_classes: int, what: str = "model"):
  """A Linen module, or an `NnxModel`, from an import path (see `create_model`).

  Raises ValueError (one line) where the path does not import or does not follow the
  conventions (docs/own_models.md).
  """
  factory = capture.load_object(path, what)
  if capture.takes_rngs(factory):
    return NnxModel(factory, num_classes)
  if isinstance(factory, (nn.Module, nnx.Module)):
    raise ConfigError(f"{what}={path!r} is a module instance; give its class or a "
                     "factory, which fsp_jax calls with num_classes=.")
  if not callable(factory):
    raise ConfigError(f"{what}={path!r} is a {type(factory).__name__}, not a Linen or "
                     "NNX module class or factory.")
  try:
    module = factory(num_classes=num_classes)
  except TypeError as e:
    raise ConfigError(f"{what}={path!r}: calling it with num_classes={num_classes} "
                     f"failed ({e}); a model given by import path takes num_classes= "
                     "(and, for NNX, rngs=).") from None
  if isinstance(module, nnx.Module):
    raise ConfigError(f"{what}={path!r} returns an NNX module but takes no rngs=; give "
                     "the NNX class, or a factory with an rngs parameter.")
  if not isinstance(module, nn.Module):
    raise ConfigError(f"{what}={path!r} returned a {type(module).__name__}, not a "
                     "flax.linen.Module (or give an NNX module class).")
  return module


def init_variables(module: nn.Module, rng: jax.Array, image_shape) -> Dict[str, Any]:
  """Initial `{'params', 'batch_stats'}` of a Linen `module` for images `(H, W, C)`
  (`batch_stats` `{}` for a model without batch norm)."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = module.init(rng, dummy, train=False)
  extra = sorted(set(variables) - {"params", "batch_stats", "intermediates"})
  if extra:
    raise ConfigError(
        f"{type(module).__name__} has variable collections {extra} besides 'params' and "
        "'batch_stats'; fsp_jax trains, checkpoints and hands over only those two.")
  return {"params": variables.get("params", {}),
          "batch_stats": variables.get("batch_stats", {})}


@functools.lru_cache(maxsize=None)
def _nnx_graphdef(factory, num_classes: int):
  """The static structure of `factory(num_classes=, rngs=)`, built abstractly."""
  abstract = nnx.eval_shape(lambda: factory(num_classes=num_classes, rngs=nnx.Rngs(0)))
  if not isinstance(abstract, nnx.Module):
    raise ConfigError(f"{getattr(factory, '__name__', factory)!r} returned a "
                     f"{type(abstract).__name__}, not an nnx.Module.")
  graphdef, _, _, rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
  others = [("/".join(map(str, path)), type(v).__name__)
            for path, v in nnx.to_flat_state(rest)]
  if others:
    where, kind = others[0]
    raise ConfigError(
        f"{type(abstract).__name__} holds state other than nnx.Param and nnx.BatchStat "
        f"({kind} at {where!r}, {len(others)} in all); fsp_jax trains, checkpoints and "
        "hands over only those two: keep rngs for initialisation only (no stored RNG "
        "streams, e.g. Dropout(rngs=...)) and no other variable types.")
  return graphdef


@dataclasses.dataclass(frozen=True)
class NnxModel:
  """An NNX model class as a pure function of `{'params', 'batch_stats'}`.

  The training steps treat every model as Linen ones are treated: variables in, outputs
  (and, in training, new batch statistics) out. An NNX model gets there by split and
  merge: `init` builds `factory(num_classes=..., rngs=nnx.Rngs(rng))` and splits off
  its `nnx.Param` and `nnx.BatchStat` state as plain nested dicts; `apply` merges them
  into the model's graph (built once, abstractly), sets `train()` or `eval()`, calls it
  and splits the updated batch statistics off again. Inside `jax.jit` this costs
  nothing at run time. Hashable (by factory and classes), so jitted steps are cached.
  """
  factory: Callable
  num_classes: int

  @property
  def graphdef(self):
    return _nnx_graphdef(self.factory, self.num_classes)

  def init(self, rng: jax.Array, image_shape) -> Dict[str, Any]:
    """Initial `{'params', 'batch_stats'}` (plain nested dicts)."""
    del image_shape  # An NNX model is built with its shapes.
    self.graphdef  # Fails early, with its message, for unsupported state.
    model = self.factory(num_classes=self.num_classes, rngs=nnx.Rngs(rng))
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return {"params": params.to_pure_dict(), "batch_stats": batch_stats.to_pure_dict()}

  def merge(self, variables, train: bool = False) -> nnx.Module:
    """The model with `variables` in it, in `train()` or `eval()` mode."""
    model = nnx.merge(self.graphdef, nnx.State(variables["params"]),
                      nnx.State(variables["batch_stats"]))
    model.train() if train else model.eval()
    return model

  def apply(self, variables, x: jax.Array, train: bool = False,
            layers: Sequence[str] = ()):
    """`(output, {layer: its output}, new batch_stats)` for inputs `x`."""
    model = self.merge(variables, train)
    if layers:
      out, features = capture.apply_and_capture(model, None, x, layers)
    else:
      out, features = model(x), {}
    return out, features, nnx.state(model, nnx.BatchStat).to_pure_dict()


@dataclasses.dataclass(frozen=True)
class Network:
  """A model as the training steps use it: the Flax module and its input normalisation.

  Images enter as uint8 `(B, H, W, C)`; `apply` standardises them per channel with
  `mean` and `std` (the training set's, 0-255 scale) before the module sees them, the
  one place where inputs are normalised. Hashable, so jitted steps are built once per
  network.

  Two kinds of module: the package's presets, which return `(logits, features)`
  themselves, and models of your own (docs/own_models.md), whose features are the
  outputs of the layers named by `layers`, taken with `fsp_jax.capture`. Either way
  `apply` gives `(logits, {name: (B, H, W, C)})` and the variables are `{'params',
  'batch_stats'}`.

  Attributes:
    module: a Linen module (a preset `(x, train) -> (logits (B, K), features)`, or
      any `(x, train) -> logits or (logits, ...)`), or an `NnxModel`.
    mean, std: per-channel statistics `(C,)` as tuples of floats.
    layers: '/'-separated layer paths whose outputs are the features, in network order;
      () = the preset's built-in features.
    feature_keys: the names `apply` gives the features, position by position (an
      experiment keys the teacher's features by the student's names); () = `layers`
      (or the preset's names).
    drop_tokens: leading tokens (class, register) dropped from token maps `(B, N, C)`.
    token_grid: `(h, w)` that the remaining tokens are viewed as, so token maps are
      `(B, h, w, C)` feature maps like any other; () = a square grid.
    classes: the number of classes where the module does not say (`num_classes`).
  """
  module: Any
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  layers: Tuple[str, ...] = ()
  feature_keys: Tuple[str, ...] = ()
  drop_tokens: int = 0
  token_grid: Tuple[int, ...] = ()
  classes: int = 0

  @property
  def num_classes(self) -> int:
    return self.classes or self.module.num_classes

  @property
  def own_feature_names(self) -> Tuple[str, ...]:
    """The features' names in the model itself: its layer paths, or a preset's names."""
    return tuple(self.layers) or tuple(getattr(self.module, "feature_names", ()))

  @property
  def feature_names(self) -> Tuple[str, ...]:
    """The keys of `apply`'s features, in network order."""
    return tuple(self.feature_keys) or self.own_feature_names

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 `(B, H, W, C)` -> float32 standardised per channel."""
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std

  def init(self, rng: jax.Array, image_shape) -> Dict[str, Any]:
    """Initial `{'params', 'batch_stats'}` for images `(H, W, C)`."""
    if isinstance(self.module, NnxModel):
      return self.module.init(rng, image_shape)
    return init_variables(self.module, rng, image_shape)

  def apply(self, variables, images: jax.Array, train: bool = False):
    """`(logits, features)`; in training mode (batch statistics of this batch)
    `((logits, features), new_batch_stats)`."""
    x = self.normalize(images)
    if isinstance(self.module, NnxModel):
      out, raw, batch_stats = self.module.apply(variables, x, train, self.layers)
    elif not self.layers:
      # A preset: its own (logits, features).
      if not train:
        out, batch_stats = self.module.apply(variables, x, train=False), None
      else:
        out, updates = self.module.apply(variables, x, train=True,
                                         mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
      if not (self.feature_keys or self.drop_tokens or self.token_grid):
        return (out, batch_stats) if train else out
      out, raw = out
    else:
      kwargs = {"train": train, **({"mutable": ["batch_stats"]} if train else {})}
      out, raw = capture.apply_and_capture(self.module, variables, x, self.layers,
                                           **kwargs)
      batch_stats = None
      if train:
        out, updates = out
        batch_stats = updates.get("batch_stats", {})
    logits = capture.first_output(out).astype(jnp.float32)
    features = self._named(raw)
    return ((logits, features), batch_stats) if train else (logits, features)

  def _named(self, raw) -> Dict[str, jax.Array]:
    """`raw` features under `feature_names`, token maps viewed as `(B, h, w, C)`."""
    out = {}
    for name, key in zip(self.own_feature_names, self.feature_names):
      f = raw[name]
      if f.ndim == 3:
        f = fsp.tokens_to_grid(f, tuple(self.token_grid) or None, self.drop_tokens)
      elif f.ndim != 4:
        raise ConfigError(
            f"layer {name!r} outputs shape {tuple(f.shape)}; a feature must be a "
            "channels-last map (B, H, W, C) or a token map (B, N, C).")
      out[key] = f
    return out
