"""Distillation methods, one module each, and the registry that finds them.

`config.methods` names methods: a built-in one (`BUILTIN`), one registered by
`register(method)`, or one of your own by import path, `'PKG.MODULE:NAME'`, where
`NAME` is a `Method` or a callable returning one (docs/methods.md, "Add a method").
Each method module declares everything the rest of fsp_jax needs: its `Method` (name,
config section with defaults, stages, labels) and the `Objective` its stages train
(`fsp_jax.methods.base`).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple

from fsp_jax.methods import base
from fsp_jax.methods.base import (STAGE_ONE_FIELDS, Method, Objective, Params,
                                  call, check_feature)
from fsp_jax.methods import (ab, at, cc, crd, dkd, fitnet, fsp, ft, kd, nst, pkt, rkd,
                             sp, vid)
from fsp_jax.methods.ab import AB
from fsp_jax.methods.at import AT
from fsp_jax.methods.cc import CC
from fsp_jax.methods.crd import CRD
from fsp_jax.methods.dkd import DKD
from fsp_jax.methods.fitnet import Hint
from fsp_jax.methods.fsp import FSP
from fsp_jax.methods.ft import FT, Paraphrase
from fsp_jax.methods.kd import KD
from fsp_jax.methods.nst import NST
from fsp_jax.methods.pkt import PKT
from fsp_jax.methods.rkd import RKD
from fsp_jax.methods.sp import SP
from fsp_jax.methods.vid import VID
from fsp_jax.validation import ConfigError

__all__ = ["AB", "AT", "BUILTIN", "CC", "CRD", "DKD", "FSP", "FT", "Hint", "KD", "Method",
           "NST", "PKT", "Paraphrase", "RKD", "SP", "VID", "Objective", "Params",
           "STAGE_ONE_FIELDS", "build_objective", "call", "check_feature", "complete",
           "for_config", "get", "objective_of", "register", "registered"]

# The built-in methods, in the order their stages run and their rows are listed.
BUILTIN = (fsp.METHOD, fitnet.METHOD, kd.METHOD, at.METHOD, sp.METHOD, pkt.METHOD,
           rkd.METHOD, nst.METHOD, cc.METHOD, vid.METHOD, ab.METHOD, ft.METHOD,
           crd.METHOD, dkd.METHOD)
_REGISTRY: Dict[str, Method] = {m.name: m for m in BUILTIN}


def register(method: Method) -> Method:
  """Makes `method` nameable in `config.methods` by its name; returns it.

  Raises ConfigError where another method has that name, section or a stage name."""
  if not isinstance(method, Method):
    raise ConfigError(f"register() takes a fsp_jax.methods.Method; got {method!r}.")
  if _REGISTRY.get(method.name, method) is not method:
    raise ConfigError(f"a method named {method.name!r} is registered already; give "
                      "yours another name.")
  for other in _REGISTRY.values():
    if other is method or other.name == method.name:
      continue
    if other.section == method.section:
      raise ConfigError(f"method {method.name!r}: config section {method.section!r} "
                        f"is method {other.name!r}'s; give it another section.")
    clash = set(other.stage_names()) & set(method.stage_names())
    if clash:
      raise ConfigError(f"method {method.name!r}: stage {sorted(clash)[0]!r} is method "
                        f"{other.name!r}'s; give it other stage names.")
  _REGISTRY[method.name] = method
  return method


def registered() -> Tuple[Method, ...]:
  """Every method known now: the built-in ones, then those registered."""
  return tuple(_REGISTRY.values())


_BY_PATH: Dict[str, Method] = {}


def _from_import_path(path: str) -> Method:
  """The method `PKG.MODULE:NAME` names, imported and registered once."""
  if path in _BY_PATH:
    return _BY_PATH[path]
  module_name, _, attr = path.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"config.methods entry {path!r}: cannot import {module_name!r} "
                      f"({e}); is its package installed or on PYTHONPATH?") from None
  if not hasattr(module, attr):
    raise ConfigError(f"config.methods entry {path!r}: module {module_name!r} has no "
                      f"{attr!r}.")
  method = getattr(module, attr)
  if not isinstance(method, Method) and callable(method):
    method = method()
  if not isinstance(method, Method):
    raise ConfigError(f"config.methods entry {path!r} is not a fsp_jax.methods.Method "
                      "(nor a callable returning one).")
  if _REGISTRY.get(method.name) is not method:
    register(method)
  _BY_PATH[path] = method
  return method


def _summed(name: str) -> Method:
  """The method 'a+b': the terms of methods a and b added to one main-task stage."""
  parts = [get(part.strip()) for part in name.split("+")]
  for part in parts:
    if part.stage_one is not None or part.term is None:
      raise ConfigError(f"config.methods entry {name!r}: {part.name!r} has a stage 1; "
                        "only methods that add a term to the main task (e.g. kd) can "
                        "be summed.", "methods")
  if len({p.name for p in parts}) != len(parts):
    raise ConfigError(f"config.methods entry {name!r} names a method twice.", "methods")
  first = parts[0]
  method = Method(name=name, section=first.section, student_stage=name,
                  label="student with " + " + ".join(p.term.label for p in parts),
                  term=base.summed([p.term for p in parts]), defaults=first.defaults,
                  color=first.color)
  _REGISTRY[name] = method
  return method


def get(name: str) -> Method:
  """The method `name`: registered (the built-in ones included), `PKG.MODULE:NAME`,
  or a sum of term methods, 'a+b' (each with its own section and weight)."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if "+" in name:
    return _summed(name)
  if ":" in name:
    return _from_import_path(name)
  raise ConfigError(f"config.methods has unknown distillation method {name!r}; choose "
                    f"from {', '.join(_REGISTRY)}, or give one of your own as "
                    "'PKG.MODULE:NAME' (docs/methods.md).", "methods")


def for_config(config) -> Tuple[Method, ...]:
  """The methods `config.methods` names, in the order their stages run (the built-in
  ones first, in `BUILTIN`'s order, then the others as named)."""
  names = config.get("methods", ())
  if isinstance(names, str):
    raise ConfigError(f"config.methods must be a tuple of names, e.g. ({names!r},); "
                      f"got the string {names!r}.", "methods")
  chosen: List[Method] = []
  for name in names:
    method = get(name)
    if method not in chosen:
      chosen.append(method)
  builtin = list(BUILTIN)
  return tuple(sorted(chosen, key=lambda m: (builtin.index(m) if m in builtin
                                             else len(builtin), chosen.index(m))))


def complete(config) -> None:
  """Adds the default config section of each method `config.methods` names that the
  config lacks (a method of your own), in place."""
  for method in for_config(config):
    sections = [method.section] + [s for o in method.objectives for s in o.sections()]
    for section in filter(None, sections):
      if section not in config:
        owner = next((m for m in registered() if m.section == section), method)
        with config.unlocked():
          config[section] = owner.default_section()


def objective_of(method: Method, kind: str) -> Optional[type]:
  """The objective of `method`'s stage of `kind` (`'classify'`: its term)."""
  return method.term if kind == "classify" else method.stage_one


def build_objective(cls: type, config, feature_names: Sequence[str] = (),
                    num_steps: int = 1) -> Objective:
  """An objective of class `cls` from its section of `config`, for a student with
  `feature_names` and a stage of `num_steps`."""
  return cls.build(config, feature_names, num_steps)


def objective_label(name: str) -> str:
  """The label of the objective named `name` (a stage kind), else `name`."""
  if "+" in name:
    return " + ".join(objective_label(part) for part in name.split("+"))
  for method in registered():
    for objective in method.objectives:
      if objective.name == name:
        return objective.label
  return name


def stage_labels() -> Dict[str, str]:
  """`{main-task stage: label}` of every known method's student."""
  return {m.student_stage: m.label for m in registered()}


def stage_colors() -> Dict[str, str]:
  """`{main-task stage: colour}` of every known method's student that has one."""
  return {m.student_stage: m.color for m in registered() if m.color}


def stage_order() -> Tuple[str, ...]:
  """Every known method's stages in the order they run."""
  return tuple(name for m in registered() for name in m.stage_names())
