"""Stage planning, each stage resolved once, and the handing over of weights.

An experiment is a row of stages: the teacher, then the stages of each distillation
method (`fsp_jax.methods`: a method-only stage 1 and a main-task stage, or the
main-task stage alone with the method's term), then the baselines. `plan_stages`
gives the row (`Stage`s), `setup` checks it all and loads the data and networks, and
`resolve` turns one planned stage into a `StageSetup`: everything its training loop
needs (networks, objective, seeds, optimizer, data feed, folder), so the loop
(`train.train_and_evaluate`) reads no config. Each stage writes under `WORKDIR/<stage>/`: Orbax checkpoints,
`metrics.jsonl`, TensorBoard events and `stage.json`, which holds the stage's
fingerprint: a workdir made by another experiment is refused before anything is written.

Weights move between stages through checkpoints only: a stage 2 restores its stage 1's
final checkpoint (`Stage.init_from`), and every stage that reads the teacher restores
the teacher's (`teacher_variables`), whether the teacher was trained in this workdir or
given as `config.teacher.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fsp_jax import checkpoints, data, methods, models, optim, validation
from fsp_jax.validation import ConfigError

BASELINES = validation.BASELINES
ROLE_SEED = {"teacher": 0, "student": 1}
DISTILLER_SEED = 2
OBJECTIVE_STATE_SEED = 3
# Data settings that never change the data (where decoded images are cached).
_NOT_FINGERPRINTED = ("cache_dir",)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of the experiment.

  Attributes:
    name: directory and results key ('teacher', 'fsp', 'student', 'scratch', ...).
    kind: 'classify' (cross-entropy on labels) or the objective of a method-only
      stage 1 ('fsp', 'hint'), trained alone (no labels).
    role: which architecture it trains: 'teacher' or 'student'.
    schedule: the stage's optimisation config (steps already scaled).
    init_from: the stage (name, or a stage directory path) whose final weights
      initialise this one, or None (random initialisation).
    distill: the objective whose term is added to a 'classify' stage's
      cross-entropy ('kd'), or None.
    schedule_field: the config field `schedule` comes from (for error messages).
    method: the `fsp_jax.methods` method whose stage it is, or None (the teacher,
      the baselines).
    params_from: the stage 1 (name, or a stage directory path) whose final objective
      parameters start this stage's term's (`Method.params_from_stage_one`), or None.
  """
  name: str
  kind: str
  role: str
  schedule: ml_collections.ConfigDict
  init_from: Optional[str] = None
  distill: Optional[str] = None
  schedule_field: str = "student.schedule"
  method: Optional[str] = None
  params_from: Optional[str] = None

  @property
  def objective_name(self) -> Optional[str]:
    """The objective the stage trains with (alone or as a term), or None."""
    return self.kind if self.kind != "classify" else self.distill

  @property
  def is_stage_one(self) -> bool:
    """A method-only stage 1 (its objective alone, no labels)."""
    return self.kind != "classify"

  def method_section(self, config):
    """The config section of the stage's method, or None."""
    return config[methods.get(self.method).section] if self.method else None


def scaled_schedule(schedule: ml_collections.ConfigDict, scale: float):
  """The schedule with num_steps and learning-rate boundaries multiplied by `scale`."""
  out = ml_collections.ConfigDict(schedule.to_dict())
  out.num_steps = max(1, int(round(schedule.num_steps * scale)))
  out.boundaries = tuple(int(round(b * scale)) for b in schedule.boundaries)
  if schedule.warmup_steps > 0:
    out.warmup_steps = max(1, int(round(schedule.warmup_steps * scale)))
  return out


def plan_stages(config) -> List[Stage]:
  """The stages a config asks for, in the order they run."""
  chosen = methods.for_config(config)  # Refuses unknown method names.
  methods.complete(config)
  validation.check_config(config, chosen)  # Every setting, before anything else.
  scale = config.schedule_scale
  student = scaled_schedule(config.student.schedule, scale)
  stages = []
  # A config of baselines only (methods=()) reads no teacher: none is trained for it.
  needs_teacher = bool(config.methods) or config.teacher_only or not config.baselines
  if not config.teacher.checkpoint and needs_teacher:
    stages.append(Stage("teacher", "classify", "teacher",
                        scaled_schedule(config.teacher.schedule, scale),
                        schedule_field="teacher.schedule"))
  if config.teacher_only:
    return stages
  for method in chosen:
    section = config[method.section]
    start = None
    if method.stage_one is not None:
      if section.get("checkpoint"):  # A finished stage 1 from elsewhere.
        start = os.path.abspath(section.checkpoint)
      else:
        stages.append(Stage(method.stage_one_name, method.stage_one.name, "student",
                            scaled_schedule(section.schedule, scale),
                            schedule_field=f"{method.section}.schedule",
                            method=method.name))
        start = method.stage_one_name
    stages.append(Stage(method.student_stage, "classify", "student", student,
                        init_from=start if method.student_from_stage_one else None,
                        distill=method.term.name if method.term is not None else None,
                        method=method.name,
                        params_from=start if method.params_from_stage_one else None))
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

  def objective(self, stage: Stage):
    """The objective the stage trains with (`fsp_jax.methods`), or None."""
    if stage.method is None or stage.objective_name is None:
      return None
    cls = methods.objective_of(methods.get(stage.method), stage.kind)
    return methods.build_objective(cls, self.config,
                                   self.networks["student"].feature_names,
                                   stage.schedule.num_steps)


def build_network(config, role: str, dataset: data.Dataset) -> models.Network:
  """The teacher's or student's network, normalising inputs with `dataset`'s stats.

  A preset (`config.<role>.model`, e.g. 'cifar_resnet26') gives its built-in features;
  a model by import path (`PKG.MODULE:NAME`, docs/own_models.md) gives the outputs of
  the layers `config.<role>.features` names. Where teacher and student name their
  features differently, the teacher's are keyed by the student's names, position by
  position (`feature_keys`), so the methods' layer settings name the student's.
  """
  spec = config[role]
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  num_classes = dataset.num_classes
  if role == "teacher" and config.teacher.num_classes:
    num_classes = config.teacher.num_classes
  module = models.create_model(spec.model, num_classes, spec.width_multiplier, dtype)
  if (models.is_import_path(spec.model) and not spec.get("features", ())
      and uses_features(config)):
    raise ConfigError(
        f"{role}.model={spec.model!r} is given by import path but names no features: "
        "give the layers whose outputs the distillation methods read, in network "
        "order, e.g. "
        f"config.{role}.features=\"('stem','block1','block2','block3')\".")
  keys = ()
  if role == "teacher":
    keys = _teacher_feature_keys(config, own_feature_names(config, "teacher"),
                                 own_feature_names(config, "student"))
  network = models.Network(
      module, tuple(float(v) for v in dataset.mean), tuple(float(v) for v in dataset.std),
      layers=tuple(spec.get("features", ())), feature_keys=keys,
      drop_tokens=int(spec.get("drop_tokens", 0)),
      token_grid=tuple(spec.get("token_grid", ())), classes=num_classes)
  if models.is_import_path(spec.model):
    check_own_model(network, dataset.image_shape, f"{role}.model={spec.model!r}")
  return network


def own_feature_names(config, role: str):
  """`role`'s feature names in the model itself: `<role>.features`, else a preset's."""
  spec = config[role]
  if spec.get("features", ()):
    return tuple(spec.features)
  if models.is_import_path(spec.model):
    return ()
  return models.create_model(spec.model, 1).feature_names


def uses_features(config) -> bool:
  """Whether some stage reads teacher and student features (not only logits)."""
  return (not config.teacher_only
          and any(m.reads_features for m in methods.for_config(config)))


def _teacher_feature_keys(config, teacher_names, student_names):
  """The student's names for the teacher's features where the two differ; () if not."""
  if tuple(teacher_names) == tuple(student_names) or not (teacher_names and
                                                           student_names):
    return ()  # The same names, or a side without features (its own check says so).
  if len(teacher_names) != len(student_names):
    if uses_features(config):
      raise ConfigError(
          f"teacher features {tuple(teacher_names)} and student features "
          f"{tuple(student_names)} differ in number; the methods pair them by "
          "position: name as many layers on each side (config teacher.features, "
          "student.features).")
    return ()
  return tuple(student_names)


def check_own_model(network: models.Network, image_shape, what: str) -> None:
  """Fails (one-line ValueError naming `what`) where a model of your own does not
  follow the conventions: init and apply in both modes, logits `(B, num_classes)`."""
  images = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.uint8)
  try:
    variables = jax.eval_shape(lambda r: network.init(r, image_shape),
                               jax.random.PRNGKey(0))
    logits, _ = jax.eval_shape(lambda v, x: network.apply(v, x), variables, images)
    jax.eval_shape(lambda v, x: network.apply(v, x, train=True), variables, images)
  except Exception as e:  # pylint: disable=broad-except  (the user's code: any error)
    text = " ".join(str(e).split()) or type(e).__name__
    raise ConfigError(f"{what}: {text[:400]} (conventions: docs/own_models.md)") from None
  if logits.shape != (2, network.num_classes):
    raise ConfigError(
        f"{what} outputs logits of shape {tuple(logits.shape)} for 2 images, not (2, "
        f"{network.num_classes}): the model's output must be the logits (B, "
        "num_classes), or a tuple whose first element they are.")


def model_fingerprint(spec) -> Dict[str, Any]:
  """What a model's config adds to a stage fingerprint beyond its name: the layers of
  its features and their token layout; {} for a preset's built-in features (so
  fingerprints of older runs still match)."""
  out = {}
  if spec.get("features", ()):
    out["features"] = list(spec.features)
  if spec.get("drop_tokens", 0):
    out["drop_tokens"] = int(spec.drop_tokens)
  if spec.get("token_grid", ()):
    out["token_grid"] = list(spec.token_grid)
  return out


def mesh_of_all_devices() -> jax.sharding.Mesh:
  """Every device on one 'data' axis, in process-major order: process p's devices hold
  rows p*B/P..(p+1)*B/P-1 of the global batch, the slice `data.train_batch` gives it."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def setup(config, workdir: str) -> Experiment:
  """Checks every stage of `config`, loads the data and builds the networks.

  Everything that can be checked before training is: schedules and run settings,
  models, distiller pairings, batch sizes against the devices and the training set,
  the teacher cache's memory, stage directories made by other experiments,
  checkpoints given from elsewhere (read in full: a corrupt one is refused). Raises
  ValueError or FileNotFoundError naming what to change.
  """
  stages = plan_stages(config)  # Checks every setting first (fsp_jax.validation).
  dataset = data.load_dataset(config.data)
  networks = {role: build_network(config, role, dataset)
              for role in ("teacher", "student")}
  if (any(s.role == "teacher" for s in stages)
      and networks["teacher"].num_classes != dataset.num_classes):
    raise ConfigError(
        f"teacher.num_classes={config.teacher.num_classes} differs from the data set's "
        f"{dataset.num_classes} classes, but this config trains the teacher on that "
        "data set: set teacher.num_classes only with a restored teacher "
        "(teacher.checkpoint).")
  exp = Experiment(config, os.path.abspath(workdir), tuple(stages), dataset,
                   mesh_of_all_devices(), networks)
  check_pairings(exp)
  for stage in stages:  # What an objective needs of the training set (CRD's classes).
    if stage.objective_name is not None:
      exp.objective(stage).check_training_set(dataset.train_labels,
                                              len(stage_seeds(exp, stage)))
  check_batches(exp)
  check_teacher_cache(exp)
  check_pretrained(exp)
  for stage in stages:
    check_stage_dir(exp, stage)
  # A missing or misfitting checkpoint from elsewhere fails before anything is written.
  if config.teacher.checkpoint and any(s.objective_name for s in stages):
    teacher_variables(exp)
  for stage in stages:
    if stage.init_from and os.path.isabs(stage.init_from):
      checkpoints.restore_model(stage.init_from, abstract_variables(exp, stage.role),
                                f"stage-1 checkpoint {stage.init_from!r}")
    if stage.params_from and os.path.isabs(stage.params_from):
      stage_one_params(exp, stage, len(stage_seeds(exp, stage)))
  check_disk_space(exp)  # A warning only: last, after every error.
  return exp


def variable_shapes(network: models.Network, image_shape):
  """Shapes (ShapeDtypeStructs) of `network`'s variables for images of `image_shape`
  `(H, W, C)`; traced once per network and shape (no compute)."""
  return _variable_shapes(network, tuple(image_shape))


def network_outputs(network: models.Network, image_shape):
  """Shapes (ShapeDtypeStructs) of `network`'s `(logits, features)` for a batch of 2;
  traced once per network and image shape `(H, W, C)` (no compute)."""
  return _network_outputs(network, tuple(image_shape))


@functools.lru_cache(maxsize=64)
def _variable_shapes(network, image_shape):
  return jax.eval_shape(lambda r: network.init(r, image_shape), jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=64)
def _jit_init(network, image_shape, sharding):
  """`network`'s jitted init `(rng) -> variables` for `image_shape`, built once per
  network, image shape and sharding: a process's later stages, runs and seeds of the
  same network reuse its trace instead of tracing and lowering it again."""
  return jax.jit(lambda r: network.init(r, image_shape), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _network_outputs(network, image_shape):
  images = jax.ShapeDtypeStruct((2,) + image_shape, jnp.uint8)
  return jax.eval_shape(network.apply, _variable_shapes(network, image_shape), images)


def check_pairings(exp: Experiment) -> None:
  """Fails before any training where a stage's teacher and student cannot be paired."""
  shape = exp.dataset.image_shape
  t_logits, t_feats = network_outputs(exp.networks["teacher"], shape)
  s_logits, s_feats = network_outputs(exp.networks["student"], shape)
  cfg = exp.config
  for stage in exp.stages:
    if stage.objective_name is None:
      continue
    try:
      distiller = exp.objective(stage)
      params = jax.eval_shape(lambda: distiller.init(jax.random.PRNGKey(0), t_feats,
                                                     s_feats))
      targets = jax.eval_shape(distiller.teacher_targets, t_logits, t_feats)
      rows = jax.ShapeDtypeStruct((s_logits.shape[0],), jnp.int32)
      state = jax.eval_shape(lambda l: distiller.init_state(jax.random.PRNGKey(0), l),
                             jax.ShapeDtypeStruct(exp.dataset.train_labels.shape,
                                                  jnp.int32))
      jax.eval_shape(lambda p, t, l, f, y, s: methods.call(
          distiller, p, t, l, f, 0, labels=y, index=y, state=s),
          params, targets, s_logits, s_feats, rows, state)
    except (ValueError, TypeError, KeyError) as e:
      raise ConfigError(f"teacher {cfg.teacher.model} and student {cfg.student.model} "
                       f"cannot be paired for stage {stage.name!r}: {e}") from None


def abstract_variables(exp: Experiment, role: str):
  """Shapes, dtypes and (replicated) shardings of `role`'s variables; no compute."""
  shapes = variable_shapes(exp.networks[role], exp.dataset.image_shape)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=exp.replicated), shapes)


# config.seed_axis: how several seeds share one program (train.over_seeds).
SEED_AXES = validation.SEED_AXES


def seeds_of(config, stage: Stage) -> List[int]:
  """The seeds a stage trains: `config.seed` for the teacher and for a stage 1 shared
  by every seed (`<method>.shared`, e.g. `fsp.shared`), `seed .. seed + N - 1`
  (`config.num_seeds`) for every other stage after the teacher, in one program."""
  if stage.name == "teacher" or (stage.is_stage_one
                                 and stage.method_section(config).get("shared")):
    return [config.seed]
  return list(range(config.seed, config.seed + config.num_seeds))


def stage_seeds(exp: Experiment, stage: Stage) -> List[int]:
  """`seeds_of` the experiment's config."""
  return seeds_of(exp.config, stage)


def input_pipeline(config, stage: Stage) -> str:
  """'host' or 'device' (`config.data.pipeline`; 'auto': 'device' on accelerators,
  'host' on CPUs, by measurement: docs/performance.md). A stage 1 whose teacher
  targets are cached (`<method>.cache_teacher`) reads them on the host."""
  choice = config.data.pipeline
  if caches_teacher(config, stage):
    return "host"
  if choice == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return choice


def caches_teacher(config, stage: Stage) -> bool:
  """Whether a stage 1 takes its teacher targets from a per-example cache computed
  once (`config.<method>.cache_teacher`) instead of running the teacher every step."""
  return stage.is_stage_one and bool(stage.method_section(config).get("cache_teacher"))


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _per_seed(exp: Experiment, seeds: List[int], make):
  """`make(seed)` for one seed, or its results stacked on a leading seed axis."""
  if len(seeds) == 1:
    return make(seeds[0])
  return jax.jit(_stack, out_shardings=exp.replicated)([make(s) for s in seeds])


def random_variables(exp: Experiment, role: str, seeds: Optional[List[int]] = None):
  """`role`'s initial variables from `(seed, role)`, replicated; with several seeds
  stacked on a leading axis (seed k's are those of a one-seed run of seed k)."""
  init = _jit_init(exp.networks[role], tuple(exp.dataset.image_shape), exp.replicated)
  return _per_seed(exp, seeds or [exp.config.seed], lambda seed: init(
      jax.random.fold_in(jax.random.PRNGKey(seed), ROLE_SEED[role])))


def initial_distiller_params(exp: Experiment, stage: Stage, distiller):
  """The objective's own initial parameters (`{}` for most stages), replicated;
  for a term that starts from its stage 1's (`Stage.params_from`), with those."""
  if distiller is None:
    return {}
  shape = exp.dataset.image_shape
  t_feats = network_outputs(exp.networks["teacher"], shape)[1]
  s_feats = network_outputs(exp.networks["student"], shape)[1]
  init = jax.jit(lambda r: distiller.init(r, t_feats, s_feats),
                 out_shardings=exp.replicated)
  seeds = stage_seeds(exp, stage)
  params = _per_seed(exp, seeds, lambda seed: init(
      jax.random.fold_in(jax.random.PRNGKey(seed), DISTILLER_SEED)))
  if not stage.params_from:
    return params
  carried = stage_one_params(exp, stage, len(seeds))
  merge = distiller.from_stage_one if len(seeds) == 1 else jax.vmap(
      distiller.from_stage_one)
  return jax.jit(merge, out_shardings=exp.replicated)(params, carried)


def stage_one_params(exp: Experiment, stage: Stage, num_seeds: int):
  """The final objective parameters of `stage.params_from` (a stage 1), with a
  leading seed axis where `num_seeds` > 1 (a one-seed stage 1 starts every seed)."""
  src = stage.params_from
  src_dir = src if os.path.isabs(src) else exp.stage_dir(src)
  what = f"stage-1 checkpoint {src_dir!r}"
  method = methods.get(stage.method)
  one = methods.build_objective(method.stage_one, exp.config,
                                exp.networks["student"].feature_names, 1)
  shape = exp.dataset.image_shape
  t_feats = network_outputs(exp.networks["teacher"], shape)[1]
  s_feats = network_outputs(exp.networks["student"], shape)[1]
  abstract = jax.eval_shape(lambda: one.init(jax.random.PRNGKey(0), t_feats, s_feats))
  stored = checkpoint_seeds(src_dir)
  if stored not in (1, num_seeds):
    raise ConfigError(f"{what} holds {stored} seeds, this stage trains {num_seeds}: "
                      f"set config.num_seeds={stored}, or give a one-seed stage 1.")
  lead = (stored,) if stored > 1 else ()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      lead + a.shape, a.dtype, sharding=exp.replicated), abstract)
  params = checkpoints.restore_distiller(src_dir, abstract, what)
  if stored == 1 and num_seeds > 1:
    params = jax.jit(lambda v: jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_seeds,) + x.shape), v),
        out_shardings=exp.replicated)(params)
  return params


def initial_objective_state(exp: Experiment, stage: Stage, objective):
  """A stateful objective's initial state (CRD's memory bank), replicated, per seed;
  `{}` for the others."""
  if objective is None or not objective.stateful:
    return {}
  labels = jax.device_put(np.asarray(exp.dataset.train_labels, np.int32),
                          exp.replicated)
  init = jax.jit(objective.init_state, out_shardings=exp.replicated)
  return _per_seed(exp, stage_seeds(exp, stage), lambda seed: init(
      jax.random.fold_in(jax.random.PRNGKey(seed), OBJECTIVE_STATE_SEED), labels))


def checkpoint_seeds(stage_dir: str) -> int:
  """How many seeds a stage directory's checkpoints hold (its stage.json; 1 where it
  has none, e.g. a converted or hand-saved checkpoint)."""
  ckpt_dir = checkpoints.resolve_checkpoint_dir(stage_dir)
  info = checkpoints.read_stage_info(os.path.dirname(ckpt_dir)) or {}
  return int(info.get("fingerprint", {}).get("num_seeds", 1))


def initial_variables(exp: Experiment, stage: Stage):
  """Where a stage's weights start: its `init_from` stage's final checkpoint, the
  teacher's pretrained weights (`teacher.pretrained`), or random. With several seeds,
  a one-seed `init_from` (e.g. one stage 1 shared by every seed, as in the paper's
  Table 1) starts every seed."""
  seeds = stage_seeds(exp, stage)
  if stage.init_from:
    init_dir = (stage.init_from if os.path.isabs(stage.init_from)
                else exp.stage_dir(stage.init_from))
    stored = checkpoint_seeds(init_dir)
    if stored not in (1, len(seeds)):
      raise ConfigError(f"stage-1 checkpoint {init_dir!r} holds {stored} seeds, this "
                       f"stage trains {len(seeds)}: set config.num_seeds={stored}, or "
                       "give a one-seed stage 1 (shared by every seed).")
    abstract = abstract_variables(exp, stage.role)
    if stored > 1:
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          (stored,) + a.shape, a.dtype, sharding=a.sharding), abstract)
    variables, _ = checkpoints.restore_model(init_dir, abstract,
                                             f"stage-1 checkpoint {init_dir!r}")
    if stored == 1 and len(seeds) > 1:
      variables = jax.jit(lambda v: jax.tree.map(
          lambda x: jnp.broadcast_to(x, (len(seeds),) + x.shape), v),
          out_shardings=exp.replicated)(variables)
    return variables
  variables = random_variables(exp, stage.role, seeds)
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
                    "width_multiplier": config.teacher.width_multiplier,
                    **model_fingerprint(config.teacher)})


def fingerprint(config, stage: Stage, stages: List[Stage]) -> Dict[str, Any]:
  """What must match for a stage directory to be resumed by this config.

  Includes what the stage's weights depend on: its own model, data, seed and schedule,
  and the fingerprints of the stages it reads (the teacher, `init_from`).
  """
  spec = config[stage.role]
  out = {"stage": stage.name, "kind": stage.kind, "model": spec.model,
         "width_multiplier": spec.width_multiplier,
         "data": {**{k: v for k, v in config.data.to_dict().items()
                     if k not in _NOT_FINGERPRINTED},
                  "pipeline": input_pipeline(config, stage)},
         "seed": config.seed, "schedule": stage.schedule.to_dict(),
         "init_from": stage.init_from, "half_precision": bool(config.half_precision),
         **model_fingerprint(spec)}
  num_seeds = len(seeds_of(config, stage))
  if num_seeds != 1:  # The checkpoints' leading seed axis.
    out["num_seeds"] = num_seeds
  if stage.role == "teacher" and config.teacher.num_classes:
    out["num_classes"] = config.teacher.num_classes
  if stage.name == "teacher" and config.teacher.pretrained:
    out["pretrained"] = os.path.abspath(config.teacher.pretrained)
  if stage.method is not None:  # What the method's objective adds.
    method = methods.get(stage.method)
    if stage.is_stage_one:
      out.update(method.stage_one.fingerprint_of(config, False))
    if stage.distill:
      out.update(method.term.fingerprint_of(config, True))
  if stage.objective_name:
    out["teacher"] = _teacher_fingerprint(config, stages)
  by_name = {s.name: s for s in stages}
  if stage.init_from in by_name:
    out["init"] = fingerprint(config, by_name[stage.init_from], stages)
  if stage.params_from:  # (absent from other stages: their fingerprints stay.)
    out["params_from"] = (fingerprint(config, by_name[stage.params_from], stages)
                          if stage.params_from in by_name else stage.params_from)
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
    raise ConfigError(
        f"{stage_dir} holds checkpoints but no {checkpoints.STAGE_INFO}, so which "
        "experiment wrote them is unknown; use a new --workdir, or delete that "
        "directory to start the stage over.")
  stored = _without_eval_every(info.get("fingerprint"))
  expected = _without_eval_every(fingerprint(exp.config, stage, list(exp.stages)))
  if stored != expected:
    raise ConfigError(
        f"{stage_dir} holds a different experiment's stage {stage.name!r} "
        f"({_first_difference(stored, expected)}); use a new --workdir, or delete "
        "that directory to start the stage over.")


def check_batches(exp: Experiment) -> None:
  """Fails before the first stage where a batch cannot be split over the devices or
  is larger than the training set (the data pipeline would only fail when that stage
  starts, after the stages before it trained)."""
  n_dev = exp.mesh.devices.size
  for stage in exp.stages:
    validation.check_batch_size(
        stage.schedule.batch_size, n_dev, len(exp.dataset.train_labels),
        f"{stage.schedule_field}.batch_size", dataset=exp.dataset.name,
        stage=stage.name)
  validation.check_batch_size(exp.config.eval_batch_size, n_dev,
                              field="eval_batch_size")


def teacher_cache_bytes(exp: Experiment, stage: Stage) -> int:
  """Host bytes of the teacher's cached targets (`config.<method>.cache_teacher`) for
  every training example of `stage`: float32, what its objective takes from the
  teacher."""
  shape = exp.dataset.image_shape
  t_logits, t_feats = network_outputs(exp.networks["teacher"], shape)
  targets = jax.eval_shape(exp.objective(stage).teacher_targets, t_logits, t_feats)
  per_example = sum(int(np.prod(t.shape[1:])) for t in jax.tree.leaves(targets)) * 4
  return len(exp.dataset.train_labels) * per_example


def check_teacher_cache(exp: Experiment, stage_list=None) -> None:
  """Fails where a stage 1's teacher cache cannot fit in 80% of the host memory free
  now: before the teacher trains, and again when that stage starts."""
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  for stage in (exp.stages if stage_list is None else stage_list):
    if not caches_teacher(exp.config, stage):
      continue
    nbytes = teacher_cache_bytes(exp, stage)
    if nbytes > 0.8 * available:
      field = f"{methods.get(stage.method).section}.cache_teacher"
      raise ConfigError(
          f"config.{field}=True needs {nbytes / 2**30:.1f} GiB of host memory for the "
          f"teacher's targets of every training example, but only "
          f"{available / 2**30:.1f} GiB are free. Set config.{field}=False (the "
          "teacher is then recomputed every step).")


def check_pretrained(exp: Experiment) -> None:
  """Fails before anything runs where `teacher.pretrained` is missing or holds another
  architecture (the stored shapes only; the classifier may differ)."""
  path = exp.config.teacher.pretrained
  if path and any(s.name == "teacher" for s in exp.stages):
    checkpoints.check_pretrained(path, abstract_variables(exp, "teacher"),
                                 "teacher.pretrained checkpoint")


def check_workdir(exp: Experiment) -> None:
  """`check_stage_dir` for every stage: again after waiting for another run, which
  may have written the workdir meanwhile."""
  for stage in exp.stages:
    check_stage_dir(exp, stage)


def checkpoint_bytes(exp: Experiment) -> int:
  """About how many bytes the run's checkpoints take at most: per stage
  `max_checkpoints_to_keep` steps of weights and SGD momentum (as many bytes again),
  per seed, plus one step in flight."""
  def stage_bytes(stage):
    shapes = jax.tree.leaves(abstract_variables(exp, stage.role))
    weights = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in shapes)
    return 2 * weights * len(stage_seeds(exp, stage))
  sizes = [stage_bytes(s) for s in exp.stages]
  return sum(sizes) * exp.config.max_checkpoints_to_keep + max(sizes, default=0)


def check_disk_space(exp: Experiment) -> None:
  """Warns (one line) before anything runs where the workdir's disk looks too small
  for the run's checkpoints; the run still starts (a full disk stops it cleanly)."""
  checkpoints.warn_if_short_of_space(exp.workdir, checkpoint_bytes(exp))


# ---- a stage resolved once: what its training loop needs -----------------------------


@dataclasses.dataclass(frozen=True)
class Feed:
  """How a stage's training inputs reach the devices, as pure functions of (seed, step).

  Attributes:
    dataset: the data set in host memory.
    mesh: the devices the global batch is sharded over.
    batch_size: the global batch (per seed).
    seeds: the seeds trained side by side, each its own data order.
    pipeline: 'host' (batches made by NumPy, prefetched) or 'device' (the training set
      on the devices, batches gathered and augmented by jitted ops).
    augment: the stage's augmentation (`data.Augment`).
    steps_per_call: training steps per jitted call.
    stops: steps that end a call where they are multiples (log, evaluation and
      checkpoint intervals).
  """
  dataset: data.Dataset
  mesh: jax.sharding.Mesh
  batch_size: int
  seeds: Tuple[int, ...]
  pipeline: str
  augment: data.Augment
  steps_per_call: int
  stops: Tuple[int, ...]

  @property
  def one_step(self) -> bool:
    """One step per call of one seed from the host: the plain `train.train_step`."""
    return (self.pipeline == "host" and self.steps_per_call == 1
            and len(self.seeds) == 1)

  @property
  def device_batch(self):
    """`(augment, mesh)` with which `train.train_steps` gathers batches on the
    devices, or None (host batches)."""
    return (self.augment, self.mesh) if self.pipeline == "device" else None

  def train_data(self):
    """The training set sharded over the mesh (device pipeline), else None."""
    if self.pipeline != "device":
      return None
    return data.device_train_data(self.dataset, self.mesh)

  def calls(self, start: int, total: int, extras=None):
    """Yields `(lo, hi, inputs)` for steps `start..total-1`: the batch of one step
    (`one_step`), else what `train.train_steps` takes for steps lo..hi-1. `extras`:
    per-example host arrays gathered into every batch (a teacher cache)."""
    if self.one_step:
      for step, batch in data.train_batches(
          self.dataset, self.mesh, self.batch_size, self.seeds[0], start, total,
          augment=self.augment, extras=extras):
        yield step, step + 1, batch
      return
    yield from data.train_calls(
        self.dataset, self.mesh, self.batch_size, list(self.seeds),
        data.call_ranges(start, total, self.steps_per_call, self.stops),
        device=self.pipeline == "device", augment=self.augment, extras=extras)


@dataclasses.dataclass(frozen=True)
class StageSetup:
  """One stage resolved: everything `train.train_and_evaluate` needs, no config.

  Attributes:
    stage: the planned stage (name, kind, role, scaled schedule, init_from).
    folder: its directory, `WORKDIR/<name>`.
    fingerprint: what its directory's `stage.json` must hold to be resumed.
    model: the name of the model it trains (for logs and results).
    network: the network it trains.
    teacher: the frozen teacher's network where its objective reads it, else None.
    objective: what it trains besides the labels (`fsp_jax.methods`), or None.
    use_labels: cross-entropy on the labels (a main-task stage) or not (a stage 1).
    caches_teacher: the teacher's targets computed once per training example.
    seeds: the seeds it trains side by side.
    seed_axis: how the seeds share the program ('vmap' or 'unrolled'; 'auto').
    learning_rate_fn: the learning rate of each step.
    optimizer: the optax optimizer.
    learning_rates_field: the config field of its learning rates (error messages).
    feed: its training inputs.
    start: where its weights start, for the log ('' = random initialisation).
    initial_variables: `() -> variables` where its weights start.
    initial_objective_params: `() -> params` of its objective's own parameters.
    initial_objective_state: `() -> state` of a stateful objective (`{}`).
    teacher_variables: `() -> variables` of the frozen teacher, or None.
    check_teacher_cache: `() -> None`, fails where the teacher cache cannot fit.
    eval_every, eval_examples, eval_batch_size, log_every, checkpoint_every,
    max_checkpoints_to_keep: the loop's intervals and sizes.
    dataset, mesh: the data set and the devices.
  """
  stage: Stage
  folder: str
  fingerprint: Dict[str, Any]
  model: str
  network: models.Network
  teacher: Optional[models.Network]
  objective: Any
  use_labels: bool
  caches_teacher: bool
  seeds: Tuple[int, ...]
  seed_axis: str
  learning_rate_fn: Callable
  optimizer: Any
  learning_rates_field: str
  feed: Feed
  start: str
  initial_variables: Callable[[], Any]
  initial_objective_params: Callable[[], Any]
  initial_objective_state: Callable[[], Any]
  teacher_variables: Optional[Callable[[], Any]]
  check_teacher_cache: Callable[[], None]
  eval_every: int
  eval_examples: int
  eval_batch_size: int
  log_every: int
  checkpoint_every: int
  max_checkpoints_to_keep: int
  dataset: data.Dataset
  mesh: jax.sharding.Mesh

  @property
  def name(self) -> str:
    return self.stage.name

  @property
  def kind(self) -> str:
    return self.stage.kind

  @property
  def role(self) -> str:
    return self.stage.role

  @property
  def schedule(self):
    return self.stage.schedule

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())


def optimizer(objective, lr_fn, schedule):
  """The stage's optax optimizer; where its objective freezes parameters (the
  student in a stage 1 of the objective's own parameters, `frozen_params`), those
  never move. The same object for the same objective and settings (`lr_fn` from
  `optim.create_learning_rate_fn`, itself one per schedule): the optimizer is part of
  the train state's structure, so a process's later runs of a stage reuse its traced
  step instead of tracing it again."""
  return _optimizer(objective, lr_fn, float(schedule.momentum),
                    float(schedule.weight_decay))


@functools.lru_cache(maxsize=256)
def _optimizer(objective, lr_fn, momentum, weight_decay):
  tx = optim.create_optimizer(lr_fn, momentum, weight_decay)
  if objective is None or not objective.freezes:
    return tx
  return optim.with_frozen(tx, lambda params: {
      "student": jax.tree.map(lambda _: objective.trains_student, params["student"]),
      "distiller": objective.trainable(params["distiller"])})


def resolve(exp: Experiment, stage: Stage) -> StageSetup:
  """`stage` of `exp` resolved into what its training loop needs (the one place the
  config is read for it)."""
  config, sched = exp.config, stage.schedule
  objective = exp.objective(stage)
  seeds = tuple(stage_seeds(exp, stage))
  lr_fn = optim.create_learning_rate_fn(sched.learning_rates, sched.boundaries,
                                        sched.warmup_steps)
  eval_every = config.eval_every if sched.eval_every < 0 else sched.eval_every
  feed = Feed(exp.dataset, exp.mesh, sched.batch_size, seeds,
              input_pipeline(config, stage),
              data.Augment.of(config.data, sched.augment,
                              crop_size=exp.dataset.crop_size or ()),
              config.steps_per_call,
              (config.log_every, eval_every, config.checkpoint_every))
  start = ""
  if stage.init_from:
    start = f"starts from the final weights of stage {stage.init_from!r}"
  elif stage.params_from:
    start = (f"starts its {objective.label} parameters from stage "
             f"{stage.params_from!r}")
  elif stage.name == "teacher" and config.teacher.pretrained:
    start = f"fine-tunes the weights of {config.teacher.pretrained}"
  reads_teacher = objective is not None
  return StageSetup(
      stage=stage, folder=exp.stage_dir(stage.name),
      fingerprint=fingerprint(config, stage, list(exp.stages)),
      model=config[stage.role].model, network=exp.networks[stage.role],
      teacher=exp.networks["teacher"] if reads_teacher else None,
      objective=objective, use_labels=stage.kind == "classify",
      caches_teacher=caches_teacher(config, stage), seeds=seeds,
      seed_axis=config.seed_axis, learning_rate_fn=lr_fn,
      optimizer=optimizer(objective, lr_fn, sched),
      learning_rates_field=f"{stage.schedule_field}.learning_rates", feed=feed,
      start=start,
      initial_variables=lambda: initial_variables(exp, stage),
      initial_objective_params=lambda: initial_distiller_params(exp, stage, objective),
      initial_objective_state=lambda: initial_objective_state(exp, stage, objective),
      teacher_variables=(lambda: teacher_variables(exp)) if reads_teacher else None,
      check_teacher_cache=lambda: check_teacher_cache(exp, [stage]),
      eval_every=eval_every, eval_examples=config.eval_examples,
      eval_batch_size=config.eval_batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every,
      max_checkpoints_to_keep=config.max_checkpoints_to_keep,
      dataset=exp.dataset, mesh=exp.mesh)
