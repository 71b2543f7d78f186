"""Every setting of a config checked before anything trains, in one place.

`check_config(config)` walks the whole config and raises `ConfigError` (a
`ValueError`) naming the first field whose value cannot run, its value and the
allowed range, e.g.

    config.teacher.schedule.num_steps must be an integer >= 1; got -5.

The checks go by the field's name, wherever it sits, so that a section a new method
adds (`config.<method>.temperature`, `config.<method>.schedule`, ...) is checked as
the shipped ones are: every schedule (a section with `num_steps` and
`learning_rates`) by `check_schedule`, numbers by `RULES` (exact names) and
`SUFFIX_RULES` (name endings such as `_weight`), choices by `CHOICES`.

The library's messages speak of `config.FIELD`; the command line shows the same
message with the flag's spelling, `--config.FIELD` (`flag_message`). Nothing here
runs JAX: the command line checks a config in seconds, before any device starts.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator, Optional, Sequence, Tuple

import ml_collections

BASELINES = ("scratch", "teacher_short")
SEED_AXES = ("auto", "vmap", "unrolled")


class ConfigError(ValueError):
  """A setting the user gave (config, data, checkpoint) cannot run.

  Attributes:
    field: the config field at fault ('teacher.schedule.num_steps'), or None.
  """

  def __init__(self, message: str, field: Optional[str] = None):
    super().__init__(message)
    self.field = field


def flag_message(error: BaseException) -> str:
  """`error`'s message in one line with each `config.FIELD` spelled as the flag that
  sets it, `--config.FIELD` (what a command-line user types)."""
  text = " ".join(str(error).split())
  return re.sub(r"(?<![-\w.])config\.(?=[A-Za-z_])", "--config.", text)


class Range:
  """An allowed range of a number: `low <= x` (or `<`), `x <= high` (or `<`).

  integer: the value must be an int (not a bool); optional: None is allowed.
  """

  def __init__(self, low=None, high=None, *, low_open=False, high_open=False,
               integer=False, optional=False, why=""):
    self.low, self.high = low, high
    self.low_open, self.high_open = low_open, high_open
    self.integer, self.optional, self.why = integer, optional, why

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    parts = []
    if self.low is not None:
      parts.append(f"{'>' if self.low_open else '>='} {self.low}")
    if self.high is not None:
      parts.append(f"{'<' if self.high_open else '<='} {self.high}")
    text = f"{kind} {' and '.join(parts)}".strip()
    return text + (" (or None)" if self.optional else "")

  def admits(self, value) -> bool:
    if value is None:
      return self.optional
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else
                                 value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.high_open else
                                  value > self.high):
      return False
    return True

  def check(self, value, field: str) -> None:
    if not self.admits(value):
      why = f" ({self.why})" if self.why else ""
      raise ConfigError(f"config.{field} must be {self.describe()}; got {value!r}{why}.",
                        field)


COUNT = Range(1, integer=True)  # Steps, sizes, intervals: at least 1.
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)

# Fields by their full path in the config.
RULES = {
    "seed": NON_NEGATIVE_INT,
    "num_seeds": COUNT,
    "schedule_scale": POSITIVE,
    "eval_batch_size": COUNT,
    "eval_every": Range(0, integer=True, why="0 evaluates only at the end of a stage"),
    "eval_examples": Range(0, integer=True, why="0 takes the whole test set"),
    "log_every": COUNT,
    "checkpoint_every": COUNT,
    "max_checkpoints_to_keep": Range(
        1, integer=True, why="2 keeps a fallback for a checkpoint that cannot be read"),
    "steps_per_call": COUNT,
    "data.pad": NON_NEGATIVE_INT,
    "data.train_per_class": Range(0, integer=True, why="0 takes every example"),
    "teacher.num_classes": Range(0, integer=True, why="0 takes the data set's"),
}
# Fields by the ending of their name, in any section (a new method's included); the
# first matching ending applies.
SUFFIX_RULES = (
    ("width_multiplier", COUNT),
    ("drop_tokens", NON_NEGATIVE_INT),
    ("final_weight", Range(0, optional=True, why="None keeps the weight constant")),
    ("temperature", POSITIVE),
    ("weight", POSITIVE),  # Loss weights: a term with weight <= 0 is not distillation.
    ("_scale", POSITIVE),
    ("momentum", Range(0, 1, high_open=True)),
    ("weight_decay", NON_NEGATIVE),
    ("batch_size", COUNT),
    ("num_steps", COUNT),
    ("warmup_steps", Range(0, integer=True, why="0 = no warm-up")),
)
# Each entry of these sequences: fields by the ending of their name.
SEQUENCE_RULES = (
    ("weights", POSITIVE),
    ("image_size", COUNT),
    ("crop_size", COUNT),
    ("token_grid", COUNT),
    ("classes", NON_NEGATIVE_INT),
)
CHOICES = {
    "data.source": ("tfds", "folder", "digits"),
    "data.pipeline": ("auto", "host", "device"),
    "seed_axis": SEED_AXES,
}
# Sizes given as (H, W).
PAIRS = ("data.image_size", "data.crop_size", "teacher.token_grid",
         "student.token_grid")


def _leaves(node, prefix: str = "") -> Iterator[Tuple[str, Any]]:
  """(dotted path, value) of every field of a ConfigDict, sections first-level first."""
  for key in node.keys():
    value = node[key]
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def _sections(node, prefix: str = "") -> Iterator[Tuple[str, Any]]:
  """(dotted path, section) of every sub-section of a ConfigDict."""
  for key in node.keys():
    value = node[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield f"{prefix}{key}", value
      yield from _sections(value, f"{prefix}{key}.")


def check_choice(value, choices: Sequence[Any], field: str) -> None:
  """Fails (ConfigError naming `config.FIELD`) where `value` is not one of `choices`."""
  if value not in choices:
    raise ConfigError(f"config.{field}={value!r} is unknown; choose from "
                      f"{', '.join(map(repr, choices))}.", field)


def check_boundaries(learning_rates: Sequence[float], boundaries: Sequence[int],
                     field: str = "schedule") -> None:
  """Fails where a piecewise-constant schedule's rates and boundaries do not pair up:
  N learning rates need N - 1 boundaries (`field`: the schedule's config path)."""
  lrs, bounds = tuple(learning_rates), tuple(boundaries)
  if len(lrs) != len(bounds) + 1:
    raise ConfigError(
        f"config.{field}: {len(lrs)} learning rates need {len(lrs) - 1} boundaries; "
        f"got {len(bounds)} (config.{field}.boundaries={bounds!r}).",
        f"{field}.boundaries")


def is_schedule(section) -> bool:
  return "num_steps" in section and "learning_rates" in section


def check_schedule(schedule, field: str) -> None:
  """Fails (ConfigError naming `config.FIELD.x`) where a stage's schedule cannot run.

  Args:
    schedule: a schedule section (`configs.default.schedule`): num_steps,
      learning_rates, boundaries, batch_size, momentum, weight_decay, eval_every,
      warmup_steps.
    field: its path in the config, e.g. 'teacher.schedule'.
  """
  COUNT.check(schedule.num_steps, f"{field}.num_steps")
  COUNT.check(schedule.batch_size, f"{field}.batch_size")
  lrs, bounds = tuple(schedule.learning_rates), tuple(schedule.boundaries)
  if not lrs:
    raise ConfigError(f"config.{field}.learning_rates is empty; give at least one "
                      "learning rate, e.g. (0.1,).", f"{field}.learning_rates")
  for lr in lrs:
    if not NON_NEGATIVE.admits(lr):  # 0 freezes the weights (a probe, a test).
      raise ConfigError(f"config.{field}.learning_rates must all be numbers >= 0; got "
                        f"{lrs!r}.", f"{field}.learning_rates")
  check_boundaries(lrs, bounds, field)
  for b in bounds:
    if not NON_NEGATIVE_INT.admits(b):
      raise ConfigError(f"config.{field}.boundaries must be integers >= 0 (steps); "
                        f"got {bounds!r}.", f"{field}.boundaries")
  if list(bounds) != sorted(bounds):
    raise ConfigError(f"config.{field}.boundaries must increase; got {bounds!r}.",
                      f"{field}.boundaries")
  if "eval_every" in schedule:
    Range(-1, integer=True, why="-1 takes the config's eval_every, 0 evaluates only at "
          "the end").check(schedule.eval_every, f"{field}.eval_every")
  for name in ("momentum", "weight_decay", "warmup_steps"):
    if name in schedule:
      _rule_for(name).check(schedule[name], f"{field}.{name}")


def _rule_for(path: str) -> Optional[Range]:
  if path in RULES:
    return RULES[path]
  name = path.rsplit(".", 1)[-1]
  for suffix, rule in SUFFIX_RULES:
    if name.endswith(suffix):
      return rule
  return None


def _check_names(config, field: str, known: Sequence[str], what: str) -> None:
  values = config[field]
  if isinstance(values, str):
    raise ConfigError(f"config.{field} must be a tuple of names, e.g. ({values!r},); "
                      f"got the string {values!r}.", field)
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ConfigError(f"config.{field} has unknown {what} {unknown}; choose from "
                      f"{', '.join(known)}.", field)


def _check_teacher_cache(config, section: str) -> None:
  """A stage 1 whose teacher targets are cached per training example
  (`config.<section>.cache_teacher`) must see every example as it is, every epoch."""
  node = config[section]
  if (node.get("cache_teacher") and node.schedule.augment
      and not node.get("checkpoint")):
    raise ConfigError(
        f"config.{section}.cache_teacher=True needs un-augmented stage-1 inputs (the "
        "teacher's targets are cached per training example), but "
        f"{section}.schedule.augment is True. Set config.{section}.schedule.augment="
        f"False (the paper's CIFAR-100 setting) or config.{section}.cache_teacher=False.",
        f"{section}.cache_teacher")


def check_config(config, methods: Optional[Sequence[Any]] = None) -> None:
  """Raises ConfigError naming the first setting of `config` that cannot run.

  Checks every schedule, number, choice and name list of the config (any section,
  a new method's included) against the ranges above, and each method's own `checks`.
  What needs the data or the models (layer names, batch sizes against the devices and
  data) is checked by `fsp_jax.stages.setup`, also before anything trains.

  Args:
    config: an experiment config (`configs/default.py`'s fields).
    methods: the `fsp_jax.methods.Method`s `config.methods` names; None resolves
      them (`fsp_jax.methods.for_config`, which refuses unknown names).
  """
  from fsp_jax import methods as methods_lib  # (it imports this module)
  if methods is None:
    methods = methods_lib.for_config(config)
  rules, choices = dict(RULES), dict(CHOICES)
  # Every known method's section is checked where the config has it, used or not.
  for method in dict.fromkeys(tuple(methods_lib.registered()) + tuple(methods)):
    for field, rule in method.checks:
      target = choices if isinstance(rule, tuple) else rules
      target[f"{method.section}.{field}"] = rule
  schedules = set()
  for path, section in _sections(config):
    if is_schedule(section):
      check_schedule(section, path)
      schedules.add(path)
  for path, value in _leaves(config):
    if path.rpartition(".")[0] in schedules:
      continue  # Checked with its schedule.
    if path in choices:
      check_choice(value, choices[path], path)
      continue
    name = path.rsplit(".", 1)[-1]
    sequence_rule = next((r for s, r in SEQUENCE_RULES if name.endswith(s)), None)
    if sequence_rule is not None and isinstance(value, (tuple, list)):
      for entry in value:
        if not sequence_rule.admits(entry):
          raise ConfigError(f"config.{path} entries must each be "
                            f"{sequence_rule.describe()}; got {tuple(value)!r}.", path)
      if path in PAIRS and len(value) not in (0, 2):
        raise ConfigError(f"config.{path} must be () or (height, width); got "
                          f"{tuple(value)!r}.", path)
      continue
    rule = rules.get(path) or _rule_for(path)
    if rule is not None and not isinstance(value, (str, tuple, list)):
      rule.check(value, path)
  for method in methods:
    if method.stage_one is not None:
      _check_teacher_cache(config, method.section)
  if "baselines" in config:
    _check_names(config, "baselines", BASELINES, "baselines")


def check_batch_size(batch_size: int, num_devices: int,
                     num_examples: Optional[int] = None, field: str = "batch_size", *,
                     dataset: str = "", stage: str = "") -> None:
  """Raises `ConfigError` where a global batch of `batch_size` examples cannot be
  split evenly over `num_devices` devices or, given `num_examples`, exceeds the
  training set (an epoch would hold no full batch). The one place these two checks
  are written: the data pipeline and the stages' check before training call it.

  Args:
    batch_size: the global batch size, the value of `config.FIELD`.
    num_devices: the devices the batch is split over (1: only the examples checked).
    num_examples: the training examples, or None (evaluation: any size is covered).
    field: the config field that sets `batch_size` ('fsp.schedule.batch_size').
    dataset, stage: named in the message where given.
  """
  of = f" of {dataset}" if dataset else ""
  in_stage = f" (stage {stage!r})" if stage else ""
  if num_examples is not None and batch_size > num_examples:
    raise ConfigError(
        f"{field}={batch_size} exceeds the {num_examples} training examples{of}; set "
        f"config.{field} to at most {num_examples}{in_stage}.", field)
  if num_devices > 1 and batch_size % num_devices:
    up = -(-batch_size // num_devices) * num_devices
    if num_examples is not None and up > num_examples and batch_size >= num_devices:
      up = batch_size // num_devices * num_devices  # The multiple below still fits.
    raise ConfigError(
        f"{field}={batch_size} is not divisible by the {num_devices} devices the batch "
        f"is split over{in_stage}; set config.{field}={up}.", field)
