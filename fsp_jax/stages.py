"""Stage planning and the handing over of weights between stages.

An experiment is a row of stages: the teacher, then per distillation method a stage 1
(FSP, FitNet hints) and a stage 2 (main task; FitNet's with Hinton KD), then the
baselines. Each stage writes under `WORKDIR/<stage>/`: Orbax checkpoints,
`metrics.jsonl`, TensorBoard events and `stage.json`, which holds the stage's
fingerprint: a workdir made by another experiment is refused before anything is written.

Weights move between stages through checkpoints only: a stage 2 restores its stage 1's
final checkpoint (`Stage.init_from`), and every stage that reads the teacher restores
the teacher's (`teacher_variables`), whether the teacher was trained in this workdir or
given as `config.teacher.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fsp_jax import checkpoints, data, distillers, models

BASELINES = ("scratch", "teacher_short")
# Distillation methods (config.methods) and the stages each runs.
METHODS = ("fsp", "fitnet", "kd")
ROLE_SEED = {"teacher": 0, "student": 1}
DISTILLER_SEED = 2
# Data settings that never change the data (where decoded images are cached).
_NOT_FINGERPRINTED = ("cache_dir",)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of the experiment.

  Attributes:
    name: directory and results key ('teacher', 'fsp', 'student', 'scratch', ...).
    kind: 'classify' (cross-entropy on labels) or the distiller of a stage 1 ('fsp',
      'hint'), whose objective alone is trained (no labels).
    role: which architecture it trains: 'teacher' or 'student'.
    schedule: the stage's optimisation config (steps already scaled).
    init_from: the stage (name, or a stage directory path) whose final weights
      initialise this one, or None (random initialisation).
    distill: a distiller whose term is added to a 'classify' stage's cross-entropy
      ('kd'), or None.
    schedule_field: the config field `schedule` comes from (for error messages).
  """
  name: str
  kind: str
  role: str
  schedule: ml_collections.ConfigDict
  init_from: Optional[str] = None
  distill: Optional[str] = None
  schedule_field: str = "student.schedule"

  @property
  def distiller_name(self) -> Optional[str]:
    """The distiller the stage trains with (its objective or added term), or None."""
    return self.kind if self.kind != "classify" else self.distill


def scaled_schedule(schedule: ml_collections.ConfigDict, scale: float):
  """The schedule with num_steps and learning-rate boundaries multiplied by `scale`."""
  out = ml_collections.ConfigDict(schedule.to_dict())
  out.num_steps = max(1, int(round(schedule.num_steps * scale)))
  out.boundaries = tuple(int(round(b * scale)) for b in schedule.boundaries)
  return out


def check_schedule(stage: Stage) -> None:
  """Fails (ValueError naming the field) where a stage's schedule cannot run."""
  s, field = stage.schedule, stage.schedule_field
  if len(s.learning_rates) != len(s.boundaries) + 1:
    raise ValueError(
        f"{field}: {len(s.learning_rates)} learning rates need "
        f"{len(s.learning_rates) - 1} boundaries; got {len(s.boundaries)} "
        f"(--config.{field}.boundaries).")
  if list(s.boundaries) != sorted(s.boundaries):
    raise ValueError(f"{field}.boundaries {tuple(s.boundaries)} must increase.")
  if s.batch_size <= 0:
    raise ValueError(f"{field}.batch_size must be positive; got {s.batch_size}.")


def plan_stages(config) -> List[Stage]:
  """The stages a config asks for, in the order they run."""
  scale = config.schedule_scale
  unknown = set(config.baselines) - set(BASELINES)
  if unknown:
    raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}.")
  unknown = set(config.methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown distillation methods {sorted(unknown)}; choose from "
                     f"{METHODS}.")
  student = scaled_schedule(config.student.schedule, scale)
  stages = []
  if not config.teacher.checkpoint:
    stages.append(Stage("teacher", "classify", "teacher",
                        scaled_schedule(config.teacher.schedule, scale),
                        schedule_field="teacher.schedule"))
  if config.teacher_only:
    return stages
  if ("fsp" in config.methods and config.fsp.cache_teacher
      and config.fsp.schedule.augment and not config.fsp.checkpoint):
    raise ValueError(
        "config.fsp.cache_teacher=True needs un-augmented stage-1 inputs (the "
        "teacher's FSP matrices are cached per training example), but "
        "fsp.schedule.augment is True. Set --config.fsp.schedule.augment=False (the "
        "paper's CIFAR-100 setting) or --config.fsp.cache_teacher=False.")
  if "fsp" in config.methods:
    stage_one = "fsp"
    if config.fsp.checkpoint:
      stage_one = os.path.abspath(config.fsp.checkpoint)
    else:
      stages.append(Stage("fsp", "fsp", "student",
                          scaled_schedule(config.fsp.schedule, scale),
                          schedule_field="fsp.schedule"))
    stages.append(Stage("student", "classify", "student", student, init_from=stage_one))
  if "fitnet" in config.methods:
    stages.append(Stage("fitnet_hint", "hint", "student",
                        scaled_schedule(config.fitnet.schedule, scale),
                        schedule_field="fitnet.schedule"))
    stages.append(Stage("fitnet", "classify", "student", student,
                        init_from="fitnet_hint", distill="kd"))
  if "kd" in config.methods:
    stages.append(Stage("kd", "classify", "student", student, distill="kd"))
  if "scratch" in config.baselines:
    stages.append(Stage("scratch", "classify", "student", student))
  if "teacher_short" in config.baselines:
    stages.append(Stage("teacher_short", "classify", "teacher", student))
  return stages


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What every stage of one config in one workdir shares (made by `setup`).

  Attributes:
    config: the experiment config.
    workdir: absolute path of the run's directory.
    stages: the planned stages, in order.
    dataset: the data set in host memory.
    mesh: the devices, one 'data' axis (process-major order).
    networks: `{'teacher': Network, 'student': Network}`.
  """
  config: Any
  workdir: str
  stages: tuple
  dataset: data.Dataset
  mesh: jax.sharding.Mesh
  networks: Dict[str, models.Network]

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def distiller(self, stage: Stage):
    """The stage's distiller (`fsp_jax.distillers`), or None."""
    if stage.distiller_name is None:
      return None
    return distillers.build(stage.distiller_name, self.config,
                            self.networks["student"].feature_names,
                            stage.schedule.num_steps)


def build_network(config, role: str, dataset: data.Dataset) -> models.Network:
  """The teacher's or student's network, normalising inputs with `dataset`'s stats."""
  spec = config[role]
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  num_classes = dataset.num_classes
  if role == "teacher" and config.teacher.num_classes:
    num_classes = config.teacher.num_classes
  module = models.create_model(spec.model, num_classes, spec.width_multiplier, dtype)
  return models.Network(module, tuple(float(v) for v in dataset.mean),
                        tuple(float(v) for v in dataset.std))


def mesh_of_all_devices() -> jax.sharding.Mesh:
  """Every device on one 'data' axis, in process-major order: process p's devices hold
  rows p*B/P..(p+1)*B/P-1 of the global batch, the slice `data.train_batch` gives it."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def setup(config, workdir: str) -> Experiment:
  """Checks every stage of `config`, loads the data and builds the networks.

  Everything that can be checked before training is: schedules, models, distiller
  pairings, stage directories made by other experiments, checkpoints given from
  elsewhere. Raises ValueError or FileNotFoundError naming what to change.
  """
  stages = plan_stages(config)
  for stage in stages:
    check_schedule(stage)
  dataset = data.load_dataset(config.data)
  networks = {role: build_network(config, role, dataset)
              for role in ("teacher", "student")}
  if (any(s.role == "teacher" for s in stages)
      and networks["teacher"].num_classes != dataset.num_classes):
    raise ValueError(
        f"teacher.num_classes={config.teacher.num_classes} differs from the data set's "
        f"{dataset.num_classes} classes, but this config trains the teacher on that "
        "data set: set teacher.num_classes only with a restored teacher "
        "(teacher.checkpoint).")
  exp = Experiment(config, os.path.abspath(workdir), tuple(stages), dataset,
                   mesh_of_all_devices(), networks)
  check_pairings(exp)
  for stage in stages:
    check_stage_dir(exp, stage)
  # A missing or misfitting checkpoint from elsewhere fails before anything is written.
  if config.teacher.checkpoint and any(s.distiller_name for s in stages):
    teacher_variables(exp)
  for stage in stages:
    if stage.init_from and os.path.isabs(stage.init_from):
      checkpoints.restore_model(stage.init_from, abstract_variables(exp, stage.role),
                                f"stage-1 checkpoint {stage.init_from!r}")
  return exp


def network_outputs(network: models.Network, image_shape):
  """Shapes (ShapeDtypeStructs) of `network`'s `(logits, features)` for a batch of 2."""
  images = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.uint8)
  variables = jax.eval_shape(lambda r: network.init(r, image_shape),
                             jax.random.PRNGKey(0))
  return jax.eval_shape(network.apply, variables, images)


def check_pairings(exp: Experiment) -> None:
  """Fails before any training where a stage's teacher and student cannot be paired."""
  shape = exp.dataset.image_shape
  t_logits, t_feats = network_outputs(exp.networks["teacher"], shape)
  s_logits, s_feats = network_outputs(exp.networks["student"], shape)
  cfg = exp.config
  for stage in exp.stages:
    if stage.distiller_name is None:
      continue
    try:
      distiller = exp.distiller(stage)
      params = jax.eval_shape(lambda: distiller.init(jax.random.PRNGKey(0), t_feats,
                                                     s_feats))
      targets = jax.eval_shape(distiller.teacher_targets, t_logits, t_feats)
      jax.eval_shape(lambda p, t, l, f: distiller.objective(p, t, l, f, 0), params,
                     targets, s_logits, s_feats)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"teacher {cfg.teacher.model} and student {cfg.student.model} "
                       f"cannot be paired for stage {stage.name!r}: {e}") from None


def abstract_variables(exp: Experiment, role: str):
  """Shapes, dtypes and (replicated) shardings of `role`'s variables; no compute."""
  shapes = jax.eval_shape(lambda r: exp.networks[role].init(r, exp.dataset.image_shape),
                          jax.random.PRNGKey(0))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=exp.replicated), shapes)


def random_variables(exp: Experiment, role: str):
  """`role`'s initial variables from `(config.seed, role)`, replicated."""
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), ROLE_SEED[role])
  return jax.jit(lambda r: exp.networks[role].init(r, exp.dataset.image_shape),
                 out_shardings=exp.replicated)(rng)


def initial_distiller_params(exp: Experiment, stage: Stage, distiller):
  """The distiller's own initial parameters (`{}` for most stages), replicated."""
  if distiller is None:
    return {}
  shape = exp.dataset.image_shape
  t_feats = network_outputs(exp.networks["teacher"], shape)[1]
  s_feats = network_outputs(exp.networks["student"], shape)[1]
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), DISTILLER_SEED)
  return jax.jit(lambda r: distiller.init(r, t_feats, s_feats),
                 out_shardings=exp.replicated)(rng)


def initial_variables(exp: Experiment, stage: Stage):
  """Where a stage's weights start: its `init_from` stage's final checkpoint, the
  teacher's pretrained weights (`teacher.pretrained`), or random."""
  if stage.init_from:
    init_dir = (stage.init_from if os.path.isabs(stage.init_from)
                else exp.stage_dir(stage.init_from))
    variables, _ = checkpoints.restore_model(
        init_dir, abstract_variables(exp, stage.role), f"stage-1 checkpoint {init_dir!r}")
    return variables
  variables = random_variables(exp, stage.role)
  if stage.name == "teacher" and exp.config.teacher.pretrained:
    variables, _ = checkpoints.restore_pretrained(exp.config.teacher.pretrained,
                                                  variables, "teacher.pretrained checkpoint")
  return variables


def teacher_variables(exp: Experiment):
  """The frozen teacher's final `{'params', 'batch_stats'}`: `config.teacher.checkpoint`,
  else this workdir's teacher stage."""
  given = exp.config.teacher.checkpoint
  what = "teacher checkpoint" if given else "teacher stage checkpoint"
  variables, _ = checkpoints.restore_model(given or exp.stage_dir("teacher"),
                                           abstract_variables(exp, "teacher"), what)
  return variables


def _jsonable(obj):
  """As it reads back from JSON (tuples become lists), so fingerprints compare."""
  return json.loads(json.dumps(obj))


def _teacher_fingerprint(config, stages: List[Stage]) -> Dict[str, Any]:
  by_name = {s.name: s for s in stages}
  if "teacher" in by_name:
    return fingerprint(config, by_name["teacher"], stages)
  return _jsonable({"checkpoint": os.path.abspath(config.teacher.checkpoint),
                    "model": config.teacher.model,
                    "width_multiplier": config.teacher.width_multiplier})


def fingerprint(config, stage: Stage, stages: List[Stage]) -> Dict[str, Any]:
  """What must match for a stage directory to be resumed by this config.

  Includes what the stage's weights depend on: its own model, data, seed and schedule,
  and the fingerprints of the stages it reads (the teacher, `init_from`).
  """
  spec = config[stage.role]
  out = {"stage": stage.name, "kind": stage.kind, "model": spec.model,
         "width_multiplier": spec.width_multiplier,
         "data": {k: v for k, v in config.data.to_dict().items()
                  if k not in _NOT_FINGERPRINTED},
         "seed": config.seed, "schedule": stage.schedule.to_dict(),
         "init_from": stage.init_from, "half_precision": bool(config.half_precision)}
  if stage.role == "teacher" and config.teacher.num_classes:
    out["num_classes"] = config.teacher.num_classes
  if stage.name == "teacher" and config.teacher.pretrained:
    out["pretrained"] = os.path.abspath(config.teacher.pretrained)
  if stage.kind == "fsp":
    out["fsp"] = {k: config.fsp[k] for k in ("fsp_pairs", "weights", "pool", "reduction",
                                             "adapter")}
  if stage.kind == "hint":
    out["fitnet"] = {k: v for k, v in config.fitnet.to_dict().items() if k != "schedule"}
  if stage.distill:
    out["distill"] = {"method": stage.distill, **config[stage.distill].to_dict()}
  if stage.distiller_name:
    out["teacher"] = _teacher_fingerprint(config, stages)
  by_name = {s.name: s for s in stages}
  if stage.init_from in by_name:
    out["init"] = fingerprint(config, by_name[stage.init_from], stages)
  return _jsonable(out)


def _without_eval_every(fp):
  """A fingerprint less evaluation frequencies, which never change the weights."""
  if isinstance(fp, dict):
    return {k: _without_eval_every(v) for k, v in fp.items() if k != "eval_every"}
  return fp


def _first_difference(there, here, path: str = "") -> str:
  """Names the first field where two fingerprints differ, e.g. 'seed: 1 there, 0 here'."""
  if isinstance(there, dict) and isinstance(here, dict):
    for key in sorted(set(there) | set(here)):
      if there.get(key) != here.get(key):
        return _first_difference(there.get(key), here.get(key),
                                 f"{path}.{key}" if path else key)
  return f"{path or 'fingerprint'}: {there!r} there, {here!r} here"


def check_stage_dir(exp: Experiment, stage: Stage) -> None:
  """Refuses a stage directory made by another experiment, before anything is written."""
  stage_dir = exp.stage_dir(stage.name)
  if not checkpoints.has_checkpoints(stage_dir):
    return  # Nothing to protect or resume; the stage starts over.
  info = checkpoints.read_stage_info(stage_dir)
  if info is None:
    raise ValueError(
        f"{stage_dir} holds checkpoints but no {checkpoints.STAGE_INFO}, so which "
        "experiment wrote them is unknown; use a new --workdir, or delete that "
        "directory to start the stage over.")
  stored = _without_eval_every(info.get("fingerprint"))
  expected = _without_eval_every(fingerprint(exp.config, stage, list(exp.stages)))
  if stored != expected:
    raise ValueError(
        f"{stage_dir} holds a different experiment's stage {stage.name!r} "
        f"({_first_difference(stored, expected)}); use a new --workdir, or delete "
        "that directory to start the stage over.")
