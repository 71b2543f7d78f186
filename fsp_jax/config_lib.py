"""Configs by name or path, with an argument: `NAME[:ARG]` or `PATH.py[:ARG]`.

The shipped configs are the package `fsp_jax.configs` (the repository's top-level
`configs/` folder, installed with the package): `--config cifar10_minimization` loads
`fsp_jax/configs/cifar10_minimization.py` wherever the package is installed. As in
big_vision, a config's `get_config(arg)` takes a string after the colon,
`'method=kd,smoke'`, which it reads with `parse_arg`.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
from typing import List, Optional, Tuple

import ml_collections

from fsp_jax.validation import ConfigError

CONFIGS_PACKAGE = "fsp_jax.configs"


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """A config argument `'key=value,flag'` as a ConfigDict over `defaults`.

  Values take the type of their default (bool, int, float, str); a bare `flag` sets
  a bool to True. E.g. `parse_arg('method=kd,smoke', method='fsp', smoke=False)`
  -> `{'method': 'kd', 'smoke': True}`. Unknown keys are an error naming the known.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r} in {arg!r}; this config takes "
                       f"{', '.join(sorted(defaults))}.")
    kind = type(defaults[key])
    if kind is bool:
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key} is a flag: give '{key}' or "
                         f"'{key}=false', not {item!r}.")
      out[key] = (not has_value) or value.lower() in ("true", "1")
    elif not has_value:
      raise ConfigError(f"config argument {key!r} needs a value, e.g. "
                       f"'{key}={defaults[key]}'.")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config argument {item!r}: {key} takes a {kind.__name__}."
                         ) from None
  return out


def schedule(num_steps, learning_rates, boundaries, batch_size=128, momentum=0.9,
             weight_decay=1e-4, augment=True, eval_every=-1, warmup_steps=0):
  """One stage's optimisation: SGD with momentum, piecewise-constant learning rate.

  eval_every: test-set evaluations every this many steps of the stage; -1 takes the
  config's `eval_every`, 0 evaluates only at the end.
  warmup_steps: the learning rate rises linearly over the first this many steps
  (scaled with the schedule; 0 = none, the paper).
  """
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, learning_rates=tuple(learning_rates),
      boundaries=tuple(boundaries), batch_size=batch_size, momentum=momentum,
      weight_decay=weight_decay, augment=augment, eval_every=eval_every,
      warmup_steps=warmup_steps))


def names() -> List[str]:
  """The shipped configs' names."""
  package = importlib.import_module(CONFIGS_PACKAGE)
  return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                if not m.name.startswith("_"))


def split(spec: str) -> Tuple[str, Optional[str]]:
  """`'NAME:ARG'` -> `('NAME', 'ARG')`; `'NAME'` -> `('NAME', None)`."""
  name, sep, arg = spec.partition(":")
  return name, (arg if sep else None)


def config_file(spec: str) -> str:
  """The config file of `NAME[:ARG]` or `PATH[:ARG]`, with the argument kept:
  what `ml_collections.config_flags` loads. Raises ValueError for an unknown name."""
  name, arg = split(spec)
  if name.endswith(".py") or os.sep in name or os.path.exists(name):
    path = name
  else:
    found = importlib.util.find_spec(f"{CONFIGS_PACKAGE}.{name}") if name.isidentifier() \
        else None
    if found is None or found.origin is None:
      raise ConfigError(f"unknown config {name!r}; the shipped configs are "
                       f"{', '.join(names())}; or give the path of a .py file.")
    path = found.origin
  return path if arg is None else f"{path}:{arg}"


def load(spec: str) -> ml_collections.ConfigDict:
  """The config `NAME[:ARG]` or `PATH[:ARG]`, e.g. `load('quickstart:smoke')`."""
  path, arg = split(config_file(spec))
  if not os.path.exists(path):
    raise ConfigError(f"config file {path} does not exist.")
  module_name = "fsp_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
