"""What a distillation method tells the rest of fsp_jax: the two base classes.

A method is a `Method` (how it enters an experiment: its name, config section, stages
and labels) whose stages train an `Objective` (what one step computes: targets taken
from the frozen teacher, the method's own learned parameters, a per-example loss).
`train.train_step` runs any objective the same way and never asks which one it runs.

Stages a method adds, in the order they run:
- a method-only stage 1 (`Method.stage_one`, its objective alone, no labels), whose
  final student weights start the main-task stage, as FSP and FitNet do;
- its main-task stage (`Method.student_stage`): cross-entropy on the labels plus
  `Method.term`'s objective where it has one (KD's), from the stage-1 weights where
  there is a stage 1, else from random weights.

An objective's interface (shapes):
- `teacher_targets(logits, features)`: what it takes from the teacher's outputs (FSP
  matrices, a hint map, logits), computed in inference mode, no gradient; `logits`
  `(B, K)`, `features` `{'stem': (B, H, W, C), 'section1': ..., ...}`.
- `init(rng, teacher_features, student_features)`: its own learned parameters (`{}`
  where it has none), trained with the student by the same optimizer and saved apart
  from the student's weights; the features may be ShapeDtypeStructs.
- `objective(params, targets, logits, features, step)`: the loss of each example
  `(B,)` from the student's outputs in train mode; the trainer averages it over the
  batch (and adds the cross-entropy in a main-task stage). A loss over the whole batch
  (relations between examples) is given to every example, `jnp.full((B,), loss)`. An
  objective with `reads_labels` also gets `labels=` `(B,)` int.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import ml_collections

from fsp_jax.validation import ConfigError

Params = Dict[str, Any]
# Section fields a method-only stage 1 may have, read by the package itself (they
# choose where stage 1 comes from and how it is fed, never what it computes; not in
# the stage's fingerprint): a finished stage 1 to reuse, the teacher's targets cached
# per training example, one stage 1 shared by every seed.
STAGE_ONE_FIELDS = ("schedule", "checkpoint", "cache_teacher", "shared")


class Objective:
  """Base class of the objective a stage trains (the interface: this module's doc).

  Subclasses are frozen dataclasses (hashable: one compiled step per objective) and
  set the class attributes below.

  Attributes:
    name: the stage kind of a stage 1 trained on it and the metric's name
      (`<name>_loss`, `test_<name>_loss`).
    label: its name in summaries ('FSP', 'FitNet hints').
    section: the config section it is built from (`from_config`).
    reads_features: whether it reads feature maps (then models by import path must
      name their features), not only logits.
  """
  name: ClassVar[str] = ""
  label: ClassVar[str] = ""
  section: ClassVar[str] = ""
  reads_features: ClassVar[bool] = False
  reads_labels: ClassVar[bool] = False
  reads_index: ClassVar[bool] = False
  stateful: ClassVar[bool] = False
  trains_student: ClassVar[bool] = True
  frozen_params: ClassVar[Tuple[str, ...]] = ()

  @classmethod
  def build(cls, config, feature_names: Sequence[str] = (),
            num_steps: int = 1) -> "Objective":
    """The objective of an experiment config (its section `config.<section>`)."""
    return cls.from_config(config[cls.section], feature_names, num_steps)

  @classmethod
  def sections(cls) -> Tuple[str, ...]:
    """The config sections it is built from."""
    return (cls.section,)

  @classmethod
  def fingerprint_of(cls, config, as_term: bool) -> Dict[str, Any]:
    """`fingerprint` of its section of the experiment config."""
    return cls.fingerprint(config[cls.section], as_term)

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (),
                  num_steps: int = 1) -> "Objective":
    """The objective of a config section, for a student with `feature_names` (fields
    may index them) and a stage of `num_steps` (weight schedules)."""
    raise NotImplementedError

  @classmethod
  def fingerprint(cls, section, as_term: bool) -> Dict[str, Any]:
    """What it adds to a stage's fingerprint: a stage 1's weights depend on every
    field of its section but those of `STAGE_ONE_FIELDS`; a term's on its section."""
    values = section.to_dict()
    if as_term:
      return {"distill": {"method": cls.name, **values}}
    return {cls.section: {k: v for k, v in values.items()
                          if k not in STAGE_ONE_FIELDS}}

  def init(self, rng, teacher_features, student_features) -> Params:
    del rng, teacher_features, student_features
    return {}

  def check_training_set(self, train_labels, num_seeds: int) -> None:
    """Fails (ConfigError, one line) where the objective cannot train on a training
    set of `train_labels` `(N,)` with `num_seeds` seeds; before anything trains."""
    del train_labels, num_seeds

  def init_state(self, rng, train_labels) -> Params:
    """The initial state of a `stateful` objective for a training set whose labels
    are `train_labels` `(N,)` int32 (a device array); `{}` where it has none."""
    del rng, train_labels
    return {}

  @property
  def freezes(self) -> bool:
    """Whether some parameters of its stage do not train (the optimizer masks them)."""
    return bool(self.frozen_params) or not self.trains_student

  def trainable(self, params: Params):
    """A tree of bools like `params`: False for the leaves of `frozen_params`."""
    import jax  # (kept light at import)
    return {k: jax.tree.map(lambda _, k=k: k not in self.frozen_params, v)
            for k, v in params.items()}

  def from_stage_one(self, params: Params, stage_one_params: Params) -> Params:
    """A term's initial `params` with what its method's stage 1 trained
    (`stage_one_params`); for one seed (the trainer maps it over seeds)."""
    del stage_one_params
    return params

  def teacher_targets(self, logits, features):
    raise NotImplementedError

  def objective(self, params: Params, targets, logits, features, step):
    raise NotImplementedError


def call(objective: Objective, params, targets, logits, features, step, *,
         labels=None, index=None, state=None):
  """`objective`'s loss of each example `(B,)` and its new state (`state` unchanged,
  `{}` where it has none), given what it reads (labels, training-set rows, state)."""
  extra = {}
  if objective.reads_labels:
    extra["labels"] = labels
  if objective.reads_index:
    if index is None:
      raise ValueError(f"objective {objective.name!r} reads each example's row in the "
                       "training set: the batch needs an 'index' (B,) entry.")
    extra["index"] = index
  if not objective.stateful:
    return objective.objective(params, targets, logits, features, step, **extra), state
  return objective.objective(params, targets, logits, features, step, state=state,
                             **extra)


def term_fingerprint(cls, config) -> Dict[str, Any]:
  """The `distill` entry of an objective added as a term: its name and section."""
  return cls.fingerprint_of(config, True)["distill"]


class Sum(Objective):
  """Several terms added to one main-task stage (`config.methods` entry 'at+kd'),
  each built from its own section with its own weight. Subclassed per combination by
  `summed` (its `parts` are the objectives' classes)."""
  parts: ClassVar[Tuple[type, ...]] = ()

  def __init__(self, objectives):
    self.objectives = tuple(objectives)

  def __eq__(self, other):
    return type(self) is type(other) and self.objectives == other.objectives

  def __hash__(self):
    return hash((type(self), self.objectives))

  def __repr__(self):
    return f"{type(self).__name__}{self.objectives!r}"

  @property
  def reads_labels_any(self) -> bool:
    return any(o.reads_labels for o in self.objectives)

  def check_training_set(self, train_labels, num_seeds: int) -> None:
    for o in self.objectives:
      o.check_training_set(train_labels, num_seeds)

  def init_state(self, rng, train_labels) -> Params:
    import jax  # (kept light at import)
    return {o.name: o.init_state(jax.random.fold_in(rng, k), train_labels)
            for k, o in enumerate(self.objectives) if o.stateful}

  @property
  def freezes(self) -> bool:
    return any(o.freezes for o in self.objectives)

  def trainable(self, params: Params):
    return {o.name: o.trainable(params[o.name]) for o in self.objectives}

  def from_stage_one(self, params: Params, stage_one_params: Params) -> Params:
    return {o.name: o.from_stage_one(params[o.name], stage_one_params)
            for o in self.objectives}

  @classmethod
  def build(cls, config, feature_names: Sequence[str] = (), num_steps: int = 1):
    return cls(p.build(config, feature_names, num_steps) for p in cls.parts)

  @classmethod
  def sections(cls) -> Tuple[str, ...]:
    return tuple(s for p in cls.parts for s in p.sections())

  @classmethod
  def fingerprint_of(cls, config, as_term: bool) -> Dict[str, Any]:
    return {"distill": {"method": cls.name,
                        "terms": [term_fingerprint(p, config) for p in cls.parts]}}

  def init(self, rng, teacher_features, student_features) -> Params:
    import jax  # (kept light at import)
    return {o.name: o.init(jax.random.fold_in(rng, k), teacher_features,
                           student_features)
            for k, o in enumerate(self.objectives)}

  def teacher_targets(self, logits, features):
    return tuple(o.teacher_targets(logits, features) for o in self.objectives)

  def objective(self, params, targets, logits, features, step, labels=None,
                index=None, state=None):
    total, new_state = 0.0, {}
    for o, t in zip(self.objectives, targets):
      loss, part_state = call(o, params[o.name], t, logits, features, step,
                              labels=labels, index=index,
                              state=(state or {}).get(o.name))
      total = total + loss
      if o.stateful:
        new_state[o.name] = part_state
    return (total, new_state) if self.stateful else total


def summed(parts: Sequence[type]) -> type:
  """The `Sum` objective class of `parts` (term objectives), named 'a+b'."""
  name = "+".join(p.name for p in parts)
  return type(f"Sum_{name.replace('+', '_')}", (Sum,), {
      "parts": tuple(parts), "name": name,
      "label": " + ".join(p.label for p in parts), "section": "",
      "reads_features": any(p.reads_features for p in parts),
      "reads_labels": any(p.reads_labels for p in parts),
      "reads_index": any(p.reads_index for p in parts),
      "stateful": any(p.stateful for p in parts)})


def resolve_layers(given: Sequence, feature_names: Sequence[str], default,
                   field: str) -> Tuple[str, ...]:
  """The feature names a method reads: `given` (names, or indices into
  `feature_names`), else `default(feature_names)`."""
  from fsp_jax import fsp as fsp_lib  # (fsp imports jax)
  if given:
    return tuple(fsp_lib.resolve_name(g, feature_names, f"{field} entry")
                 for g in given)
  layers = tuple(default(tuple(feature_names)))
  if not layers:
    raise ConfigError(f"config.{field} is empty and the student has no features to "
                      "read by default; name them (config.student.features).", field)
  return layers


def embedding(feature):
  """`(B, D)` float32: a feature map `(B, H, W, C)` averaged over its positions (the
  input of a ResNet's classifier for the last section's map), or `(B, D)` as is."""
  import jax.numpy as jnp
  x = feature.astype(jnp.float32)
  return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if x.ndim > 2 else x


def batch_loss(loss, logits):
  """A loss over the whole batch, given to every example: `(B,)`."""
  import jax.numpy as jnp
  return jnp.full((logits.shape[0],), loss, jnp.float32)


@dataclasses.dataclass(frozen=True)
class LayerTerm(Objective):
  """A term comparing the student's and the teacher's features of the same names
  (their maps, or with `embed` their embeddings), summed over `layers`, times
  `weight`, over the whole batch (`batch_loss`). A subclass gives `pair_loss` and its
  class attributes; its extra dataclass fields are read from its config section by
  name.

  Attributes:
    layers: the features read, student and teacher alike.
    weight: the term's weight (RepDistiller's beta).
  """
  layers: Tuple[str, ...]
  weight: float = 1.0
  reads_features = True
  embed: ClassVar[bool] = False  # Read `embedding(map)` instead of the map.

  @staticmethod
  def default_layers(names: Tuple[str, ...]) -> Tuple[str, ...]:
    """The layers read where the config names none: each section's output."""
    return names[1:]

  @classmethod
  def from_config(cls, section, feature_names: Sequence[str] = (), num_steps: int = 1):
    del num_steps
    layers = resolve_layers(section.layers, feature_names, cls.default_layers,
                            f"{cls.section}.layers")
    extra = {f.name: section[f.name] for f in dataclasses.fields(cls)
             if f.name not in ("layers", "weight")}
    return cls(layers, section.weight, **extra)

  def init(self, rng, teacher_features, student_features) -> Params:
    del rng
    for layer in self.layers:
      check_feature(layer, teacher_features, f"{self.label} layer")
      check_feature(layer, student_features, f"{self.label} layer")
    return {}

  def read(self, feature):
    return embedding(feature) if self.embed else feature

  def teacher_targets(self, logits, features):
    """The teacher's maps `(B, H, W, C)` (or embeddings `(B, D)`), one per layer."""
    del logits
    return tuple(self.read(features[layer]) for layer in self.layers)

  def pair_loss(self, student, teacher):
    """The batch's loss between one layer's student and teacher values (a scalar)."""
    raise NotImplementedError

  def objective(self, params: Params, targets, logits, features, step):
    """`(B,)`: weight x the batch's loss summed over layers, for every example."""
    del params, step
    loss = sum(self.pair_loss(self.read(features[layer]), target)
               for layer, target in zip(self.layers, targets))
    return batch_loss(self.weight * loss, logits)


def check_feature(name: str, features, what: str) -> None:
  """Fails (one line) where `name` is not among `features`."""
  if name not in features:
    raise ConfigError(f"{what} {name!r} is not a feature of the network; its features "
                      f"are {tuple(sorted(features))}.")


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method: what `config.methods` names and what it runs.

  Attributes:
    name: its entry in `config.methods`.
    section: its config section, `config.<section>` (`defaults` fills it).
    label: its student's row in result tables and plots.
    student_stage: its main-task stage's folder and results key.
    stage_one: the objective of its method-only stage 1, or None.
    stage_one_name: that stage's folder and results key.
    term: the objective added to its main-task cross-entropy, or None.
    color: its student's colour in plots (a matplotlib colour).
    checks: its section's settings beyond the generic checks of
      `fsp_jax.validation`: `{field: Range or tuple of allowed values}`.
    defaults: `() -> ConfigDict`, its section with defaults (a stage 1's with a
      `schedule`, e.g. `config_lib.schedule(...)`).
    smoke: `(section) -> None`, shrinks the section for `:smoke` configs (a stage 1's
      schedule to a few steps); None leaves it.
    student_from_stage_one: the main-task stage starts from the stage 1's final
      student weights (FSP, FitNet, AB); False: from random weights (FT, whose stage 1
      trains only its own parameters).
    params_from_stage_one: the term's parameters start from those the stage 1
      trained (`Objective.from_stage_one`: FT's paraphraser).
  """
  name: str
  section: str
  label: str
  student_stage: str
  defaults: Any
  stage_one: Optional[type] = None
  stage_one_name: str = ""
  term: Optional[type] = None
  color: str = ""
  checks: Tuple[Tuple[str, Any], ...] = ()
  smoke: Any = None
  student_from_stage_one: bool = True
  params_from_stage_one: bool = False

  def __post_init__(self):
    if not self.name or not self.section or not self.student_stage:
      raise ConfigError(f"method {self!r} needs a name, a config section and a "
                        "student_stage.")
    if self.stage_one is not None and not self.stage_one_name:
      raise ConfigError(f"method {self.name!r} has a stage 1 ({self.stage_one}) but no "
                        "stage_one_name (its folder).")
    if self.params_from_stage_one and (self.stage_one is None or self.term is None):
      raise ConfigError(f"method {self.name!r} takes its term's parameters from its "
                        "stage 1 (params_from_stage_one) but lacks a stage 1 or a term.")
    if self.stage_one is None and self.term is None:
      raise ConfigError(f"method {self.name!r} has neither a stage 1 nor a term: it "
                        "would train a plain student (the 'scratch' baseline).")

  @property
  def objectives(self) -> Tuple[type, ...]:
    """Its objectives' classes (a sum's parts each)."""
    out = []
    for o in (self.stage_one, self.term):
      if o is not None:
        out.extend(o.parts if issubclass(o, Sum) else (o,))
    return tuple(out)

  @property
  def reads_features(self) -> bool:
    return any(o.reads_features for o in self.objectives)

  def stage_names(self) -> Tuple[str, ...]:
    return ((self.stage_one_name,) if self.stage_one else ()) + (self.student_stage,)

  def default_section(self) -> ml_collections.ConfigDict:
    section = self.defaults()
    if not isinstance(section, ml_collections.ConfigDict):
      section = ml_collections.ConfigDict(section)
    return section
