"""The two-stage pipeline: teacher, then per distillation method a stage 1 (FSP, FitNet
hints) and a stage 2 (main task, FitNet's with Hinton KD), then baselines.

Each stage writes under `WORKDIR/<stage>/`: Orbax checkpoints, `metrics.jsonl` and
`stage.json`. `WORKDIR/results.json` collects each finished stage's final numbers.
Running the same command again skips finished stages and resumes an interrupted one
from its last checkpoint; the data order depends only on the step, so a resumed stage
computes what an uninterrupted one would.

Reliability (see README "Reliability"):
- A kill (even SIGKILL, even mid-save) loses at most the steps since the last complete
  checkpoint: Orbax commits a step by renaming its folder, JSON files are replaced
  atomically, and `metrics.jsonl` is cut back to the restored step on resume.
- SIGTERM (one process) or a JAX preemption notice (several processes, all agreeing on
  the step) saves a checkpoint after the current step and raises `Preempted`.
- A non-finite loss is tracked on the device after every step (no host sync) and
  checked at log steps and before every save, and parameters are checked before every
  save: no checkpoint with a NaN or inf is ever written, and the error names the first
  bad step.
- `stage.json` holds a fingerprint of the config a stage directory was made by; a
  workdir of another experiment is refused before anything is written.
- Several processes (multi-host): every process runs the same steps and calls every
  Orbax save and restore; JSON files and logs come from process 0 only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax.experimental import multihost_utils

from fsp_jax import checkpoints, data, distillers, models, train
from fsp_jax.metrics import MetricsWriter

log = logging.getLogger("fsp_jax")
RESULTS = "results.json"
TEST_LOGITS = "test_logits.npy"  # A classification stage's final test-set logits.
BASELINES = ("scratch", "teacher_short")
# Distillation methods (config.methods) and the stages each runs.
METHODS = ("fsp", "fitnet", "kd")
ROLE_SEED = {"teacher": 0, "student": 1}
DISTILLER_SEED = 2
# Config fields added after the first release, left out of stage fingerprints while
# they hold these defaults so that workdirs of earlier versions still resume.
_NEW_DATA_DEFAULTS = {"crop_size": (), "classes": (), "train_per_class": 0}
# Data settings that never change the data (where decoded images are cached).
_NOT_FINGERPRINTED = ("cache_dir",)
_LABELS = {"fsp": "FSP", "hint": "FitNet hints", "kd": "KD"}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of the pipeline.

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


def scaled_schedule(schedule: ml_collections.ConfigDict, scale: float):
  """The schedule with num_steps and learning-rate boundaries multiplied by `scale`."""
  out = ml_collections.ConfigDict(schedule.to_dict())
  out.num_steps = max(1, int(round(schedule.num_steps * scale)))
  out.boundaries = tuple(int(round(b * scale)) for b in schedule.boundaries)
  return out


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
  if "fsp" in config.methods and config.fsp.get("cache_teacher", False):
    if config.fsp.schedule.augment and not config.fsp.checkpoint:
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


def build_model(config, role: str, num_classes: int):
  spec = config[role]
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  if role == "teacher" and config.teacher.get("num_classes"):
    num_classes = config.teacher.num_classes
  return models.create_model(spec.model, num_classes, spec.width_multiplier, dtype)


def build_distiller(config, name: str, num_steps: int = 1):
  """The `fsp_jax.distillers` method `name` ('fsp', 'hint', 'kd') as configured."""
  if name == "fsp":
    return distillers.FSP(tuple(tuple(p) for p in config.fsp.fsp_pairs),
                          tuple(config.fsp.weights) or None, config.fsp.pool,
                          adapter=config.fsp.get("adapter", False),
                          reduction=config.fsp.get("reduction", "sum"))
  if name == "hint":
    f = config.fitnet
    return distillers.Hint(f.hint_feature, f.guided_feature, f.regressor_kernel,
                           f.pool)
  if name == "kd":
    k = config.kd
    return distillers.KD(k.temperature, k.weight, k.get("final_weight"), num_steps,
                         k.scale_by_t_squared)
  raise ValueError(f"unknown distiller {name!r}; choose from {sorted(_LABELS)}.")


def stage_distiller(config, stage: Stage):
  """The distiller a stage trains with (its stage-1 objective or added term), or None."""
  if stage.kind != "classify":
    return build_distiller(config, stage.kind)
  if stage.distill:
    return build_distiller(config, stage.distill, stage.schedule.num_steps)
  return None


def model_outputs(model, image_shape):
  """Shapes (ShapeDtypeStructs) of `model`'s `(logits, features)` for a batch of 2."""
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: train.init_variables(
      model, jax.random.PRNGKey(0), image_shape))
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def check_distillers(config, stages, outputs) -> None:
  """Fails before any training where a stage's teacher and student cannot be paired.

  Args:
    outputs: `{'teacher': (logits, features), 'student': ...}` shapes (`model_outputs`).
  """
  t_logits, t_feats = outputs["teacher"]
  s_logits, s_feats = outputs["student"]
  for stage in stages:
    distiller = stage_distiller(config, stage)
    if distiller is None:
      continue
    try:
      params = jax.eval_shape(lambda: distiller.init(jax.random.PRNGKey(0), t_feats,
                                                     s_feats))
      targets = jax.eval_shape(distiller.teacher_targets, t_logits, t_feats)
      jax.eval_shape(lambda p, t, l, f: distiller.objective(p, t, l, f, 0), params,
                     targets, s_logits, s_feats)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"teacher {config.teacher.model} and student "
                       f"{config.student.model} cannot be paired for "
                       f"{_LABELS[distiller.name]}: {e}") from None


def read_results(workdir: str) -> Dict[str, Any]:
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it: finished stages are "
                     "then only evaluated again from their final checkpoints.") from None


def write_json(path: str, obj) -> None:
  """Atomic write (temp file + rename): a kill never leaves a half-written file."""
  checkpoints.write_json_atomic(path, obj)


def _without_eval_every(fp):
  """A fingerprint less evaluation frequencies, which never change the weights."""
  if isinstance(fp, dict):
    return {k: _without_eval_every(v) for k, v in fp.items() if k != "eval_every"}
  return fp


def _legacy_fingerprint(config, stage: Stage) -> Dict[str, Any]:
  """The fingerprint of fsp_jax 0.1.0 workdirs, still accepted so they can resume."""
  spec = config[stage.role]
  data_config = {k: v for k, v in config.data.to_dict().items()
                 if k not in _NOT_FINGERPRINTED and not (
                     k in _NEW_DATA_DEFAULTS and _jsonable(v) == _jsonable(
                         _NEW_DATA_DEFAULTS[k]))}
  fingerprint = {"stage": stage.name, "kind": stage.kind, "model": spec.model,
                 "width_multiplier": spec.width_multiplier, "data": data_config,
                 "seed": config.seed, "schedule": stage.schedule.to_dict(),
                 "init_from": stage.init_from}
  # Settings added with the pluggable distillers, only where they apply.
  if stage.kind == "fsp" and config.fsp.get("adapter"):
    fingerprint["fsp_adapter"] = True
  if stage.kind == "hint":
    fingerprint["fitnet"] = {k: v for k, v in config.fitnet.to_dict().items()
                             if k != "schedule"}
  if stage.distill:
    fingerprint["distill"] = {"method": stage.distill, **config[stage.distill].to_dict()}
  if stage.role == "teacher" and config.teacher.get("num_classes"):
    fingerprint["num_classes"] = config.teacher.num_classes
  if stage.name == "teacher" and config.teacher.get("pretrained"):
    fingerprint["pretrained"] = os.path.abspath(config.teacher.pretrained)
  return _jsonable(fingerprint)


def fingerprint(config, stage: Stage, stages: List[Stage]) -> Dict[str, Any]:
  """What must match for a stage directory to be resumed by this config.

  Includes what the stage's weights depend on: its own model, data, seed and schedule,
  and the fingerprints of the stages it reads (the teacher for stage 1, `init_from`).
  """
  out = _legacy_fingerprint(config, stage)
  out["half_precision"] = bool(config.half_precision)
  by_name = {s.name: s for s in stages}
  if stage.kind == "fsp":
    out["fsp"] = _jsonable({k: config.fsp[k] for k in ("fsp_pairs", "weights", "pool")})
    if config.fsp.get("reduction", "sum") != "sum":  # Added later: old workdirs resume.
      out["fsp"]["reduction"] = config.fsp.reduction
    if "teacher" in by_name:
      out["teacher"] = fingerprint(config, by_name["teacher"], stages)
    else:
      out["teacher"] = _jsonable({"checkpoint": os.path.abspath(config.teacher.checkpoint),
                                  "model": config.teacher.model,
                                  "width_multiplier": config.teacher.width_multiplier})
  if stage.init_from in by_name:
    out["init"] = fingerprint(config, by_name[stage.init_from], stages)
  return out


def _jsonable(obj):
  """As it reads back from JSON (tuples become lists), so fingerprints compare."""
  return json.loads(json.dumps(obj))


def _first_difference(there, here, path: str = "") -> str:
  """Names the first field where two fingerprints differ, e.g. 'seed: 1 there, 0 here'."""
  if isinstance(there, dict) and isinstance(here, dict):
    for key in sorted(set(there) | set(here)):
      if there.get(key) != here.get(key):
        return _first_difference(there.get(key), here.get(key),
                                 f"{path}.{key}" if path else key)
  return f"{path or 'fingerprint'}: {there!r} there, {here!r} here"


class Preempted(Exception):
  """Raised after SIGTERM (or a preemption notice) once a checkpoint has been written."""


class PreemptionWatch:
  """Says when to save and stop: after SIGTERM, at the same step on every process.

  One process: a SIGTERM handler sets a flag (restored on exit). Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`, which takes over
  SIGTERM) makes every process stop at one agreed step, so that all of them join the
  collective save; `reached` must then be called at every step by every process.
  """

  def __init__(self):
    self.signalled = False
    self._multi = jax.process_count() > 1
    self._old_handler = None
    self._ticks = 0  # Steps run by this process, all stages: the same on every process.

  def __enter__(self):
    if not self._multi and _main_thread():
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

  def _on_sigterm(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint after this step, then exiting.")
    self.signalled = True

  def reached(self) -> bool:
    """Call once per training step; True where this step must be saved and the run end."""
    self._ticks += 1
    if self._multi and not self.signalled:
      try:
        self.signalled = multihost_utils.reached_preemption_sync_point(self._ticks)
      except RuntimeError as e:  # jax_enable_preemption_service=False.
        log.warning("no preemption checkpoints (SIGTERM kills): %s", e)
        self._multi = False
    return self.signalled


def _sync(name: str) -> None:
  """Waits for every process (a no-op with one), e.g. after process 0 wrote a file."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@functools.lru_cache(maxsize=None)
def _predict_fn(model):
  """Jitted `(variables, uint8 images (B, H, W, C), mean, std) -> logits (B, K)`, one
  per model (Linen modules compare by value): the Pipelines of an ensemble's members
  share its compilation."""
  return jax.jit(lambda v, images, mean, std: model.apply(
      v, train.normalize(images, mean, std), train=False)[0])


class Pipeline:
  """Runs the stages of one config in one workdir."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.dataset = data.load_dataset(config.data)
    # Process-major device order: process p's devices hold rows p*B/P..(p+1)*B/P-1 of
    # the global batch, the slice `data.train_batch` gives it.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    nc = self.dataset.num_classes
    self.models = {"teacher": build_model(config, "teacher", nc),
                   "student": build_model(config, "student", nc)}
    self.mean = jax.device_put(jnp.asarray(self.dataset.mean), self.replicated)
    self.std = jax.device_put(jnp.asarray(self.dataset.std), self.replicated)
    self.stages = plan_stages(config)
    if (any(s.role == "teacher" for s in self.stages)
        and self.models["teacher"].num_classes != nc):
      raise ValueError(
          f"teacher.num_classes={config.teacher.num_classes} differs from the data set's "
          f"{nc} classes, but this config trains the teacher on that data set: set "
          "teacher.num_classes only with a restored teacher (teacher.checkpoint).")
    self.outputs = {role: model_outputs(m, self.dataset.image_shape)
                    for role, m in self.models.items()}
    check_distillers(config, self.stages, self.outputs)
    self.fingerprints = {s.name: fingerprint(config, s, self.stages) for s in self.stages}
    for stage in self.stages:
      self.check_stage_dir(stage)
    self._teacher_variables = None
    self._track_nonfinite = jax.jit(train.track_nonfinite)
    self._all_finite = jax.jit(train.all_finite)
    self.preemption = None
    # A missing or misfitting checkpoint from elsewhere fails before anything is written.
    if config.teacher.checkpoint and any(s.kind == "fsp" for s in self.stages):
      self.teacher_variables()
    for stage in self.stages:
      if stage.init_from and os.path.isabs(stage.init_from):
        checkpoints.restore_model(stage.init_from, self.abstract_variables(stage.role),
                                  f"stage-1 checkpoint {stage.init_from!r}")

  # ---- helpers -------------------------------------------------------------------
  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def check_stage_dir(self, stage: Stage) -> None:
    """Refuses a stage directory made by another experiment, before anything is written."""
    stage_dir = self.stage_dir(stage.name)
    if not checkpoints.has_checkpoints(stage_dir):
      return  # Nothing to protect or resume; the stage starts over.
    info = checkpoints.read_stage_info(stage_dir)
    if info is None:
      raise ValueError(
          f"{stage_dir} holds checkpoints but no {checkpoints.STAGE_INFO}, so which "
          "experiment wrote them is unknown; use a new --workdir, or delete that "
          "directory to start the stage over.")
    stored = _without_eval_every(info.get("fingerprint"))
    expected = _without_eval_every(self.fingerprints[stage.name])
    if stored in (expected,
                  _without_eval_every(_legacy_fingerprint(self.config, stage))):
      return
    raise ValueError(
        f"{stage_dir} holds a different experiment's stage {stage.name!r} "
        f"({_first_difference(stored, expected)}); use a new --workdir, or delete "
        "that directory to start the stage over.")

  def init_variables(self, role: str):
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), ROLE_SEED[role])
    variables = jax.jit(functools.partial(train.init_variables, self.models[role],
                                          image_shape=self.dataset.image_shape),
                        out_shardings=self.replicated)(rng)
    return variables

  def abstract_variables(self, role: str):
    """Shapes, dtypes and (replicated) shardings of `role`'s variables; no compute."""
    shapes = jax.eval_shape(functools.partial(
        train.init_variables, self.models[role], image_shape=self.dataset.image_shape),
        jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def teacher_variables(self):
    if self._teacher_variables is None:
      path = self.config.teacher.checkpoint or self.stage_dir("teacher")
      what = ("teacher checkpoint" if self.config.teacher.checkpoint
              else "teacher stage checkpoint")
      self._teacher_variables, _ = checkpoints.restore_model(
          path, self.abstract_variables("teacher"), what)
    return self._teacher_variables

  def evaluate(self, stage: Stage, variables, distiller_params=None,
               examples: int = 0, logits_path: str = "") -> Dict[str, float]:
    """Test accuracy and loss, or for a stage 1 its objective: `test_<distiller>_loss`.

    `examples` > 0 (and below the test set's size) evaluates on that many test
    examples, a fixed random subset (the same in every call), and says so in the
    result (`test_examples`); 0 takes the whole test set. With `logits_path`, a
    classifier's test logits `(N, K)` are saved there too (`.npy`; one process only),
    what `test_logits` reads back for ensembles.
    """
    images, labels = self._test_split(examples)
    bs = self.config.eval_batch_size
    subset = ({"test_examples": len(labels)}
              if len(labels) < len(self.dataset.test_labels) else {})
    model = self.models[stage.role]
    totals = None
    if stage.kind == "classify":
      with_logits = bool(logits_path) and jax.process_count() == 1
      step = self._eval_classify(model, with_logits)
      logits = []
      for batch in data.eval_batches(images, labels, self.mesh, bs):
        sums = step(variables, batch, self.mean, self.std)
        if with_logits:
          logits.append(np.asarray(jax.device_get(sums.pop("logits"))))
        totals = train.accumulate(totals, sums)
      if with_logits:
        checkpoints.write_npy_atomic(logits_path, np.concatenate(logits)[:len(labels)])
      return {"test_accuracy": float(totals["correct"] / totals["count"]),
              "test_loss": float(totals["loss"] / totals["count"]), **subset}
    distiller = stage_distiller(self.config, stage)
    step = self._eval_distill(model, distiller)
    teacher = self.teacher_variables()
    for batch in data.eval_batches(images, labels, self.mesh, bs):
      totals = train.accumulate(totals, step(variables, distiller_params or {}, teacher,
                                             batch, self.mean, self.std))
    key = f"{distiller.name}_loss"
    return {f"test_{key}": float(totals[key] / totals["count"]), **subset}

  @functools.lru_cache(maxsize=None)
  def _test_split(self, examples: int):
    """`(images, labels)` of the test set, or of a fixed random subset of `examples`
    (test sets stored class by class make a prefix the wrong sample); drawn once per
    size, not at every evaluation."""
    ds = self.dataset
    n = len(ds.test_labels)
    if examples <= 0 or examples >= n:
      return ds.test_images, ds.test_labels
    keep = np.sort(np.random.default_rng(0).permutation(n)[:examples])
    return ds.test_images[keep], ds.test_labels[keep]

  def predict(self, role: str, variables) -> np.ndarray:
    """Test-set logits `(N_test, num_classes)` of a `role` model, in inference mode."""
    fn = _predict_fn(self.models[role])
    ds = self.dataset
    out = [np.asarray(jax.device_get(fn(variables, batch["image"], self.mean, self.std)))
           for batch in data.eval_batches(ds.test_images, ds.test_labels, self.mesh,
                                          self.config.eval_batch_size)]
    return np.concatenate(out)[:len(ds.test_labels)]

  def final_variables(self, stage_name: str, role: str):
    """The final `{'params', 'batch_stats'}` of a finished stage of this workdir."""
    return checkpoints.restore_model(self.stage_dir(stage_name),
                                     self.abstract_variables(role))[0]

  def test_logits(self, stage_name: str, role: str) -> np.ndarray:
    """Test-set logits `(N_test, K)` of a finished classification stage: those its final
    evaluation saved, else computed from its final checkpoint."""
    path = os.path.join(self.stage_dir(stage_name), TEST_LOGITS)
    if os.path.exists(path):
      logits = np.load(path)
      if logits.shape == (len(self.dataset.test_labels), self.models[role].num_classes):
        return logits
    return self.predict(role, self.final_variables(stage_name, role))

  @functools.lru_cache(maxsize=None)
  def _eval_classify(self, model, with_logits: bool = False):
    return jax.jit(functools.partial(train.eval_classify_step, model.apply,
                                     with_logits=with_logits))

  @functools.lru_cache(maxsize=None)
  def _eval_distill(self, model, distiller):
    return jax.jit(functools.partial(
        train.eval_distill_step, model.apply, teacher_apply=self.models["teacher"].apply,
        distiller=distiller))

  def uses_teacher_cache(self, stage: Stage) -> bool:
    return stage.kind == "fsp" and bool(self.config.fsp.get("cache_teacher", False))

  def teacher_cache(self, stage: Stage):
    """`{'teacher_targets': matrices}`: the frozen teacher's FSP matrices of every
    training example (host float32, one `(N, m, n)` array per pair), gathered into each
    batch by the input pipeline; None unless `uses_teacher_cache(stage)`.

    The teacher is in inference mode, so an example's matrices depend on the example
    only, never on the rest of its batch: with un-augmented inputs they are the same
    every epoch, and computing them once gives the loss that recomputing gives.
    """
    if not self.uses_teacher_cache(stage):
      return None
    ds, bs = self.dataset, self.config.eval_batch_size
    distiller = stage_distiller(self.config, stage)
    teacher = self.teacher_variables()
    targets = train.jit_teacher_targets(self.models["teacher"].apply, distiller)

    def fn(v, images):
      return targets(v, images, self.mean, self.std)
    shapes = jax.eval_shape(fn, teacher, jax.ShapeDtypeStruct(
        (bs,) + tuple(ds.image_shape), jnp.uint8))
    per_example = sum(int(np.prod(s.shape[1:])) for s in jax.tree.leaves(shapes)) * 4
    nbytes = len(ds.train_labels) * per_example
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.8 * available:
      raise ValueError(
          f"config.fsp.cache_teacher=True needs {nbytes / 2**30:.1f} GiB of host memory "
          f"for the teacher's FSP matrices, but only {available / 2**30:.1f} GiB are "
          "free. Set --config.fsp.cache_teacher=False (the teacher is then recomputed "
          "every step).")
    t0 = time.time()
    cache = data.map_examples(lambda images: fn(teacher, images), ds.train_images,
                              self.mesh, bs)
    log.info("[%s] cached the teacher's FSP matrices of %d training examples "
             "(%.2f GiB on the host) in %.0f s.", stage.name, len(ds.train_labels),
             nbytes / 2**30, time.time() - t0)
    return {"teacher_targets": cache}

  def make_train_step(self, stage: Stage):
    """`(state, batch) -> (state, metrics)`: `train.jit_train_step` for `stage`."""
    distiller = stage_distiller(self.config, stage)
    cached = self.uses_teacher_cache(stage)
    step = train.jit_train_step(self.models["teacher"].apply, distiller,
                                use_labels=stage.kind == "classify",
                                cached_targets=cached)
    teacher = self.teacher_variables() if distiller is not None and not cached else None
    return lambda state, batch: step(state, teacher, batch, self.mean, self.std)

  def init_distiller_params(self, stage: Stage):
    """The stage's distiller's own initial parameters (`{}` for most stages)."""
    distiller = stage_distiller(self.config, stage)
    if distiller is None:
      return {}
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), DISTILLER_SEED)
    return jax.jit(lambda r: distiller.init(r, self.outputs["teacher"][1],
                                            self.outputs["student"][1]),
                   out_shardings=self.replicated)(rng)

  # ---- stages --------------------------------------------------------------------
  def run(self) -> Dict[str, Any]:
    results = read_results(self.workdir)
    with PreemptionWatch() as self.preemption:
      for stage in self.stages:
        if stage.name in results and os.path.isdir(self.stage_dir(stage.name)):
          log.info("[%s] finished earlier (%s); skipping.", stage.name,
                   _summary(results[stage.name]))
          continue
        results[stage.name] = self.run_stage(stage)
        if jax.process_index() == 0:
          write_json(os.path.join(self.workdir, RESULTS), results)
        _sync(f"results {stage.name}")
        if self.preemption.signalled and stage is not self.stages[-1]:
          raise Preempted(f"[{stage.name}] SIGTERM: stage finished and saved.")
    return results

  def run_stage(self, stage: Stage) -> Dict[str, Any]:
    cfg, sched = self.config, stage.schedule
    stage_dir = self.stage_dir(stage.name)
    # stage.json first: no checkpoint exists without the fingerprint of its experiment.
    if jax.process_index() == 0:
      checkpoints.write_stage_info(stage_dir, {"fingerprint": self.fingerprints[stage.name]})
    _sync(f"stage.json {stage.name}")

    model = self.models[stage.role]
    if stage.init_from:
      init_dir = (stage.init_from if os.path.isabs(stage.init_from)
                  else self.stage_dir(stage.init_from))
      variables, from_step = checkpoints.restore_model(
          init_dir, self.abstract_variables(stage.role),
          f"stage-1 checkpoint {init_dir!r}")
      log.info("[%s] starts from stage %r's weights (its step %d).", stage.name,
               stage.init_from, from_step)
    else:
      variables = self.init_variables(stage.role)
      if stage.name == "teacher" and cfg.teacher.get("pretrained"):
        variables, _ = checkpoints.restore_pretrained(cfg.teacher.pretrained, variables,
                                                      "teacher.pretrained checkpoint")
        log.info("[%s] fine-tunes the weights of %s.", stage.name, cfg.teacher.pretrained)
    lr_fn = train.create_learning_rate_fn(sched.learning_rates, sched.boundaries)
    tx = train.create_optimizer(lr_fn, sched.momentum, sched.weight_decay)
    distiller_params = self.init_distiller_params(stage)
    state = jax.jit(lambda v, d: train.create_train_state(model, v, tx, d),
                    out_shardings=self.replicated)(variables, distiller_params)

    mngr = checkpoints.manager(stage_dir, cfg.max_checkpoints_to_keep)
    start = mngr.latest_step() or 0
    # Wall time of the steps the restored checkpoint holds; steps redone after a kill
    # are not counted twice.
    wall_before = 0.0
    if start:
      state, meta = checkpoints.restore_state(mngr, start, state)
      wall_before = float(meta.get("wall_time_s", 0.0))
      log.info("[%s] resumes from its checkpoint at step %d.", stage.name, start)
    metrics = MetricsWriter(stage_dir, start, kind=stage.kind, final_step=sched.num_steps)
    step_fn = self.make_train_step(stage)

    total = sched.num_steps
    eval_every = sched.get("eval_every", -1)
    eval_every = cfg.eval_every if eval_every < 0 else eval_every
    log.info("[%s] %s of %s (%s), steps %d..%d, batch %d.", stage.name, stage.kind,
             cfg[stage.role].model, stage.role, start, total, sched.batch_size)
    t_stage = time.time()
    t_log, step_log = time.time(), start
    last_saved = start
    first_bad = jax.device_put((jnp.int32(-1), jnp.float32(0)), self.replicated)

    def save(step):
      self._check_finite(stage, first_bad, state, step, mngr)
      checkpoints.save(mngr, step, state,
                       {"wall_time_s": wall_before + time.time() - t_stage})

    try:
      batches = data.train_batches(self.dataset, self.mesh, sched.batch_size, cfg.seed,
                                   start, total, augment=sched.augment,
                                   pad=cfg.data.pad, flip=cfg.data.flip,
                                   extras=self.teacher_cache(stage))
      for step, batch in batches:
        state, step_metrics = step_fn(state, batch)
        done = step + 1
        first_bad = self._track_nonfinite(first_bad, step_metrics["loss"], done)
        preempted = self.preemption is not None and self.preemption.reached()
        if done % cfg.log_every == 0 or done == total:
          self._check_finite(stage, first_bad, None, done, mngr)
          m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          now = time.time()
          ips = (done - step_log) * sched.batch_size / max(now - t_log, 1e-9)
          eta = (total - done) * sched.batch_size / max(ips, 1e-9)
          lr = float(lr_fn(done - 1))
          log.info("[%s] step %d/%d loss %.4g %.0f img/s ETA %s", stage.name, done,
                   total, m["loss"], ips, _hms(eta))
          metrics.write({"step": done, "learning_rate": lr, "images_per_s": ips, **m})
          t_log, step_log = now, done
        if eval_every and done % eval_every == 0 and done != total:
          metrics.write({"step": done, **self.evaluate(
              stage, state.variables, state.distiller_params,
              examples=cfg.eval_examples)})
        if done % cfg.checkpoint_every == 0 or done == total or preempted:
          save(done)
          last_saved = done
        if preempted:
          mngr.wait_until_finished()
          raise Preempted(f"[{stage.name}] SIGTERM: checkpoint at step {done} saved.")
      if last_saved != total:  # e.g. resumed at the final step.
        save(total)
      mngr.wait_until_finished()
    finally:
      mngr.close()  # Waits for a save in flight: the last good checkpoint completes.
    final = self.evaluate(stage, state.variables, state.distiller_params,
                          logits_path=os.path.join(stage_dir, TEST_LOGITS))
    wall = wall_before + time.time() - t_stage
    metrics.write({"step": total, **final})
    result = {"kind": stage.kind, "model": cfg[stage.role].model, "steps": total,
              "wall_time_s": round(wall, 1), **final}
    log.info("[%s] done: %s", stage.name, _summary(result))
    if stage.name == "teacher":
      self._teacher_variables = state.variables
    return result

  def _check_finite(self, stage: Stage, first_bad, state, step: int, mngr) -> None:
    """Raises FloatingPointError where a loss so far, or `state`, is NaN or infinite.

    Called at log steps (state None: the loss only) and before every save.
    """
    bad_step, bad_loss = (int(first_bad[0]), float(first_bad[1]))
    if bad_step < 0 and (state is None or bool(self._all_finite(state.variables))):
      return
    mngr.wait_until_finished()
    good = mngr.latest_step()
    what = (f"the loss became {bad_loss} at step {bad_step}" if bad_step >= 0 else
            f"the parameters became NaN or infinite by step {step}")
    kept = (f"the last good checkpoint (step {good}) is kept" if good is not None
            else "no checkpoint was written")
    raise FloatingPointError(
        f"[{stage.name}] {what}; training stopped and {kept}. Lower the learning "
        f"rate (--config.{stage.schedule_field}.learning_rates) and rerun with a new "
        f"--workdir (or delete {self.stage_dir(stage.name)} to redo the stage).")


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _summary(result: Dict[str, Any]) -> str:
  if "test_accuracy" in result:
    return (f"test accuracy {100 * result['test_accuracy']:.2f}% after {result['steps']} "
            f"steps, {result['wall_time_s']:.0f} s")
  key = next((k for k in result if k.startswith("test_") and k.endswith("_loss")),
             "test_loss")
  name = _LABELS.get(key[len("test_"):-len("_loss")], key)
  return (f"test {name} loss {result.get(key, float('nan')):.4g} after "
          f"{result['steps']} steps, {result['wall_time_s']:.0f} s")


def results_table(results: Dict[str, Any]) -> str:
  """A small text table: each classification stage's final test accuracy."""
  labels = {"teacher": "teacher", "teacher_short": "teacher, student's schedule",
            "scratch": "student from scratch", "student": "FSP student (stage 2)",
            "fitnet": "FitNet student (stage 2, KD)", "kd": "student with Hinton KD"}
  rows = [("run", "model", "steps", "test acc %", "time s")]
  for name, r in results.items():
    if "test_accuracy" not in r:
      continue
    rows.append((labels.get(name, name), r["model"], str(r["steps"]),
                 f"{100 * r['test_accuracy']:.2f}", f"{r['wall_time_s']:.0f}"))
  widths = [max(len(row[k]) for row in rows) for k in range(5)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def run(config, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) every stage of `config` in `workdir`; returns results.json."""
  return Pipeline(config, workdir).run()
