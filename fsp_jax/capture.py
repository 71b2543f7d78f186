"""Features of any Flax model by layer path: `capture_features` for Linen and NNX models,
and models given by import path (`PKG.MODULE:NAME`).

    feats = capture_features(model, variables, images, ("block1", "block2"), train=False)
    feats["block2"]                      # that submodule's __call__ output

No model edits: Linen models run under `capture_intermediates` with a filter on the
module path (only the named layers are recorded); NNX models run under `nnx.capture`
with `nnx.Intermediate`, the named submodules sowing their outputs. Everything is a pure
function of the variables and inputs for Linen (`jax.jit`, `jax.grad`, sharded inputs
apply as to `model.apply`); NNX models are called as they are, so jit/grad them as NNX
models are (`nnx.jit`, or `nnx.split`/`nnx.merge` inside `jax.jit`, what
`fsp_jax.models.Network` does).

A layer path is '/'-separated, relative to the top module: Linen submodule names
(`'block2'`, `'encoder/layer3/mlp'`, `'Dense_0'` for unnamed ones), NNX attribute names
with list indices (`'blocks/3'`). `layer_paths` lists a model's layers.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
from flax import nnx

from fsp_jax.validation import ConfigError

# Where Linen intermediates go (flax's collection name) and the NNX sow name.
_LINEN_COLLECTION = "intermediates"
_NNX_NAME = "fsp_jax_capture"


def _is_nnx(model) -> bool:
  return isinstance(model, nnx.Module)


def first_output(out):
  """A layer's output: the first element where it returns a tuple or list."""
  return out[0] if isinstance(out, (tuple, list)) else out


def _check_layers(layers) -> Tuple[str, ...]:
  if isinstance(layers, str):
    raise ConfigError(f"layers={layers!r} is one string; give a sequence of layer paths, "
                     f"e.g. ({layers!r},).")
  layers = tuple(layers)
  for name in layers:
    if not isinstance(name, str) or not name.strip("/"):
      raise ConfigError(f"layer {name!r} is not a layer path; give '/'-separated "
                       "submodule names such as 'block2' or 'encoder/layer3'.")
  return tuple(name.strip("/") for name in layers)


def unknown_layer_error(name: str, available: Sequence[str], model) -> ValueError:
  """One line naming the layer, the closest existing paths and how to list them all."""
  close = difflib.get_close_matches(name, available, n=5, cutoff=0.0)
  shown = ", ".join(repr(p) for p in close) if close else "none"
  return ValueError(
      f"layer {name!r} is not a layer of {type(model).__name__}; closest layer paths: "
      f"{shown} ({len(available)} layers in all; fsp_jax.capture.layer_paths lists "
      "them).")


# ---------------------------------------------------------------------------- Linen


def _linen_mutable(mutable):
  """The user's `mutable`, with the intermediates collection added; whether the user
  asked for intermediates themselves."""
  if mutable is True:
    return True, True
  if mutable is False or mutable is None:
    return [_LINEN_COLLECTION], False
  if isinstance(mutable, str):
    mutable = [mutable]
  mutable = list(mutable)
  asked = _LINEN_COLLECTION in mutable
  return (mutable if asked else mutable + [_LINEN_COLLECTION]), asked


def _linen_paths(tree, prefix=()) -> Tuple[str, ...]:
  """Module paths in a captured intermediates tree (a module's entry holds '__call__')."""
  out = []
  for key, value in tree.items():
    if key == "__call__":
      if prefix:
        out.append("/".join(prefix))
    elif isinstance(value, Mapping):
      out.extend(_linen_paths(value, prefix + (str(key),)))
  return tuple(out)


def _linen_lookup(tree, path: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  if not isinstance(node, Mapping) or "__call__" not in node:
    return None
  # One entry per call of the layer; the last call's output, as a forward hook sees it.
  return first_output(node["__call__"][-1])


def _linen_apply(model: nn.Module, variables, inputs, layers, kwargs):
  if "capture_intermediates" in kwargs:
    raise ValueError("capture_features sets capture_intermediates itself; do not pass "
                     "it.")
  user_mutable = kwargs.pop("mutable", False)
  mutable, asked = _linen_mutable(user_mutable)
  wanted = frozenset(layers)

  def only_wanted(module, method_name):
    return method_name == "__call__" and "/".join(module.path) in wanted

  out, state = model.apply(variables, inputs, capture_intermediates=only_wanted,
                           mutable=mutable, **kwargs)
  state = dict(state)
  captured = state.get(_LINEN_COLLECTION, {})
  features = {}
  for name in layers:
    value = _linen_lookup(captured, name)
    if value is None:
      available = linen_layer_paths(model, variables, inputs, **kwargs)
      raise unknown_layer_error(name, available, model)
    features[name] = value
  if not asked:
    state.pop(_LINEN_COLLECTION, None)
  if user_mutable is False or user_mutable is None:
    return out, features
  return (out, state), features


def linen_layer_paths(model: nn.Module, variables, inputs,
                      **apply_kwargs) -> Tuple[str, ...]:
  """Paths of every submodule a Linen `model.apply` calls, in call order; no compute
  (shapes only)."""
  apply_kwargs = {k: v for k, v in apply_kwargs.items()
                  if k not in ("mutable", "capture_intermediates")}
  _, state = jax.eval_shape(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable=[_LINEN_COLLECTION], **apply_kwargs),
      variables, inputs)
  return _linen_paths(state.get(_LINEN_COLLECTION, {}))


# ------------------------------------------------------------------------------ NNX


def nnx_layer_paths(model: nnx.Module) -> Tuple[str, ...]:
  """Attribute paths of every submodule of an NNX model (`'blocks/3'`)."""
  return tuple("/".join(str(p) for p in path) for path, _ in nnx.iter_modules(model)
               if path)


def _sowing(cls, targets):
  """A `__call__` for `cls` that sows its output where `self` is one of `targets`."""
  call = cls.__call__

  def __call__(self, *args, **kwargs):
    out = call(self, *args, **kwargs)
    if type(self) is cls and any(self is t for t in targets):
      self.sow(nnx.Intermediate, _NNX_NAME, first_output(out))
    return out
  return __call__


def _nnx_apply(model: nnx.Module, inputs, layers, kwargs):
  modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)
             if path}
  for name in layers:
    if name not in modules:
      raise unknown_layer_error(name, tuple(modules), model)
  targets = [modules[name] for name in layers]
  # Instance methods cannot replace `__call__` (Python looks it up on the class), so the
  # targets' classes sow for the duration of the call only. nnx.capture's own
  # `method_outputs` would sow every public method of every module, and misses a
  # `__call__` inherited from a base class.
  patched = []
  try:
    for cls in dict.fromkeys(type(t) for t in targets):
      patched.append((cls, cls.__dict__.get("__call__")))
      cls.__call__ = _sowing(cls, targets)
    out, state = nnx.capture(lambda m, x: m(x, **kwargs), nnx.Intermediate)(model, inputs)
  finally:
    for cls, original in reversed(patched):
      if original is None:
        del cls.__call__
      else:
        cls.__call__ = original
  sown = state.to_pure_dict()
  features = {}
  for name in layers:
    node = sown
    try:
      for part in name.split("/"):
        # List entries are keyed by int in NNX state, by their digits in a path.
        node = node[part] if part in node else node[int(part)]
      features[name] = node[_NNX_NAME][-1]  # The last call's output.
    except (KeyError, ValueError, TypeError):
      raise ConfigError(f"layer {name!r} of {type(model).__name__} did not run in the "
                       "forward pass; name a layer that computes the model's output."
                       ) from None
  return out, features


# -------------------------------------------------------------------------- the API


def apply_and_capture(model, variables, inputs, layers: Sequence[str], **apply_kwargs):
  """`(output, features)`: what `model.apply(variables, inputs, **apply_kwargs)`
  returns (Linen; `(y, updated_collections)` with a `mutable=`) or `model(inputs,
  **apply_kwargs)` (NNX, `variables=None`), and the named layers' outputs.

  See `capture_features` for the arguments.
  """
  layers = _check_layers(layers)
  if _is_nnx(model):
    if variables is not None:
      raise ValueError("an NNX model holds its own variables: pass variables=None "
                       "(or nnx.merge the state into the model first).")
    return _nnx_apply(model, inputs, layers, apply_kwargs)
  if isinstance(model, nn.Module):
    return _linen_apply(model, variables, inputs, layers, dict(apply_kwargs))
  raise ValueError(f"capture_features takes a flax.linen.Module or a flax.nnx.Module; "
                   f"got {type(model).__name__}.")


def capture_features(model, variables, inputs, layers: Sequence[str],
                     **apply_kwargs) -> Dict[str, Any]:
  """The outputs of a model's layers, by layer path, with no edit of the model.

  Args:
    model: a `flax.linen.Module` or a `flax.nnx.Module`.
    variables: the Linen model's variables (`{'params': ..., 'batch_stats': ...}`);
      None for an NNX model (it holds its own).
    inputs: the model's input, e.g. images `(B, H, W, C)`.
    layers: '/'-separated paths of submodules relative to the top module, e.g.
      `('block1', 'encoder/layer3/mlp')` (Linen names, NNX attribute names with list
      indices: `'blocks/3'`).
    **apply_kwargs: passed to `model.apply` (Linen; e.g. `train=True,
      mutable=['batch_stats']`, collections then update as in a plain apply) or to the
      call `model(inputs, ...)` (NNX).

  Returns:
    `{path: that submodule's __call__ output}` (in the order of `layers`, where no
    JAX transformation re-sorts the dict's keys); where the
    submodule returns a tuple, its first element; where it runs several times in one
    forward pass, its last call's (as a PyTorch forward hook would record).

  Raises:
    ValueError (one line) where a path is not a layer, naming the closest ones.
  """
  return apply_and_capture(model, variables, inputs, layers, **apply_kwargs)[1]


def layer_paths(model, variables=None, inputs=None, **apply_kwargs) -> Tuple[str, ...]:
  """Every layer path `capture_features` accepts for `model` (Linen: the submodules
  `model.apply(variables, inputs, **apply_kwargs)` calls; NNX: every submodule)."""
  if _is_nnx(model):
    return nnx_layer_paths(model)
  return linen_layer_paths(model, variables, inputs, **apply_kwargs)


def load_object(path: str, what: str = "model"):
  """The object an import path `'PKG.MODULE:NAME'` names (NAME may be dotted).

  Raises:
    ValueError (one line) saying what could not be imported or found and how to fix it.
  """
  module_name, sep, attr = str(path).partition(":")
  if not sep or not module_name or not attr:
    raise ConfigError(f"{what}={path!r} is not an import path; give PKG.MODULE:NAME, "
                     "e.g. 'examples.cnn_linen:SmallCNN'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"{what}={path!r}: cannot import module {module_name!r} ({e}); "
                     "check the name and that its folder is on PYTHONPATH.") from None
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      names = [n for n in dir(obj) if not n.startswith("_")]
      close = difflib.get_close_matches(part, names, n=3)
      hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
      raise ConfigError(f"{what}={path!r}: module {module_name!r} has no {attr!r}{hint}")
    obj = getattr(obj, part)
  return obj


def takes_rngs(factory) -> bool:
  """Whether `factory` (a class or function) has an `rngs` parameter (NNX)."""
  if isinstance(factory, type) and issubclass(factory, nnx.Module):
    return True
  try:
    return "rngs" in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return False
