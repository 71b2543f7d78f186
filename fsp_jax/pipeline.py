"""The two-stage FSP pipeline: teacher, stage 1 (FSP), stage 2 (main task), baselines.

Each stage writes under `WORKDIR/<stage>/`: Orbax checkpoints, `metrics.jsonl` and
`stage.json`. `WORKDIR/results.json` collects each finished stage's final numbers.
Running the same command again skips finished stages and resumes an interrupted one
from its last checkpoint; the data order depends only on the step, so a resumed stage
computes what an uninterrupted one would.
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

from fsp_jax import checkpoints, data, fsp, models, train

log = logging.getLogger("fsp_jax")
RESULTS = "results.json"
BASELINES = ("scratch", "teacher_short")
ROLE_SEED = {"teacher": 0, "student": 1}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run of the pipeline.

  Attributes:
    name: directory and results key ('teacher', 'fsp', 'student', 'scratch', ...).
    kind: 'classify' (cross-entropy) or 'fsp' (stage 1).
    role: which architecture it trains: 'teacher' or 'student'.
    schedule: the stage's optimisation config (steps already scaled).
    init_from: the stage (name, or a stage directory path) whose final weights
      initialise this one, or None (random initialisation).
  """
  name: str
  kind: str
  role: str
  schedule: ml_collections.ConfigDict
  init_from: Optional[str] = None


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
  student = scaled_schedule(config.student.schedule, scale)
  stages = []
  if not config.teacher.checkpoint:
    stages.append(Stage("teacher", "classify", "teacher",
                        scaled_schedule(config.teacher.schedule, scale)))
  if config.teacher_only:
    return stages
  if config.fsp.get("cache_teacher", False) and config.fsp.schedule.augment:
    raise ValueError(
        "config.fsp.cache_teacher=True needs un-augmented stage-1 inputs (the teacher's "
        "FSP matrices are cached per training example), but fsp.schedule.augment is "
        "True. Set --config.fsp.schedule.augment=False (the paper's CIFAR-100 setting) "
        "or --config.fsp.cache_teacher=False.")
  stage_one = "fsp"
  if config.fsp.checkpoint:
    stage_one = os.path.abspath(config.fsp.checkpoint)
  else:
    stages.append(Stage("fsp", "fsp", "student",
                        scaled_schedule(config.fsp.schedule, scale)))
  stages.append(Stage("student", "classify", "student", student, init_from=stage_one))
  if "scratch" in config.baselines:
    stages.append(Stage("scratch", "classify", "student", student))
  if "teacher_short" in config.baselines:
    stages.append(Stage("teacher_short", "classify", "teacher", student))
  return stages


def build_model(config, role: str, num_classes: int):
  spec = config[role]
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  return models.create_model(spec.model, num_classes, spec.width_multiplier, dtype)


def fsp_settings(config, num_features: int):
  pairs = tuple(tuple(p) for p in config.fsp.fsp_pairs) or fsp.default_fsp_pairs(
      num_features)
  weights = tuple(config.fsp.weights) or None
  return pairs, weights, config.fsp.pool


def check_fsp_compatible(teacher, student, image_shape, config) -> None:
  """Fails before any training where teacher and student FSP matrices cannot pair."""
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  shapes = {}
  for role, model in (("teacher", teacher), ("student", student)):
    variables = jax.eval_shape(lambda m=model: train.init_variables(
        m, jax.random.PRNGKey(0), image_shape))
    _, feats = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False),
                              variables, x)
    shapes[role] = feats
  pairs, weights, pool = fsp_settings(config, len(shapes["student"]))
  try:
    jax.eval_shape(lambda t, s: fsp.fsp_loss(t, s, pairs, weights, pool),
                   shapes["teacher"], shapes["student"])
  except ValueError as e:
    raise ValueError(f"teacher {config.teacher.model} and student "
                     f"{config.student.model} cannot be paired for FSP: {e}") from None


def read_results(workdir: str) -> Dict[str, Any]:
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  """Atomic write (temp file + rename): a kill never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


class MetricsWriter:
  """JSON lines of one stage, from process 0; a resume drops lines past its step."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    kept = []
    if os.path.exists(path) and start_step > 0:
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= start_step:
              kept.append(line if line.endswith("\n") else line + "\n")
          except json.JSONDecodeError:
            pass  # A line cut by a kill.
    with open(path, "w") as f:
      f.writelines(kept)

  def write(self, record: Dict[str, Any]) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _fingerprint(config, stage: Stage) -> Dict[str, Any]:
  """What must match for a stage directory to be resumed by this config."""
  spec = config[stage.role]
  return _jsonable({"stage": stage.name, "kind": stage.kind, "model": spec.model,
          "width_multiplier": spec.width_multiplier, "data": config.data.to_dict(),
          "seed": config.seed, "schedule": stage.schedule.to_dict(),
          "init_from": stage.init_from})


def _jsonable(obj):
  """As it reads back from JSON (tuples become lists), so fingerprints compare."""
  return json.loads(json.dumps(obj))


class Preempted(Exception):
  """Raised after SIGTERM once a checkpoint has been written."""


class Pipeline:
  """Runs the stages of one config in one workdir."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.dataset = data.load_dataset(config.data)
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    nc = self.dataset.num_classes
    self.models = {"teacher": build_model(config, "teacher", nc),
                   "student": build_model(config, "student", nc)}
    self.mean = jax.device_put(jnp.asarray(self.dataset.mean), self.replicated)
    self.std = jax.device_put(jnp.asarray(self.dataset.std), self.replicated)
    self.stages = plan_stages(config)
    check_fsp_compatible(self.models["teacher"], self.models["student"],
                         self.dataset.image_shape, config)
    self._teacher_variables = None
    self._sigterm = False

  # ---- helpers -------------------------------------------------------------------
  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def init_variables(self, role: str):
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), ROLE_SEED[role])
    variables = jax.jit(functools.partial(train.init_variables, self.models[role],
                                          image_shape=self.dataset.image_shape),
                        out_shardings=self.replicated)(rng)
    return variables

  def teacher_variables(self):
    if self._teacher_variables is None:
      path = self.config.teacher.checkpoint or self.stage_dir("teacher")
      what = ("teacher checkpoint" if self.config.teacher.checkpoint
              else "teacher stage checkpoint")
      template = self.init_variables("teacher")
      self._teacher_variables, _ = checkpoints.restore_model(path, template, what)
    return self._teacher_variables

  def evaluate(self, stage: Stage, variables) -> Dict[str, float]:
    ds, bs = self.dataset, self.config.eval_batch_size
    model = self.models[stage.role]
    totals = None
    if stage.kind == "classify":
      step = self._eval_classify(model)
      for batch in data.eval_batches(ds.test_images, ds.test_labels, self.mesh, bs):
        totals = train.accumulate(totals, step(variables, batch, self.mean, self.std))
      return {"test_accuracy": float(totals["correct"] / totals["count"]),
              "test_loss": float(totals["loss"] / totals["count"])}
    step = self._eval_fsp(model)
    teacher = self.teacher_variables()
    for batch in data.eval_batches(ds.test_images, ds.test_labels, self.mesh, bs):
      totals = train.accumulate(totals, step(variables, teacher, batch, self.mean,
                                             self.std))
    return {"test_fsp_loss": float(totals["fsp_loss"] / totals["count"])}

  def predict(self, role: str, variables) -> np.ndarray:
    """Test-set logits `(N_test, num_classes)` of a `role` model, in inference mode."""
    model = self.models[role]
    fn = jax.jit(lambda v, b: model.apply(v, train.normalize(b["image"], self.mean,
                                                             self.std), train=False)[0])
    ds = self.dataset
    out = [np.asarray(jax.device_get(fn(variables, batch)))
           for batch in data.eval_batches(ds.test_images, ds.test_labels, self.mesh,
                                          self.config.eval_batch_size)]
    return np.concatenate(out)[:len(ds.test_labels)]

  def final_variables(self, stage_name: str, role: str):
    """The final `{'params', 'batch_stats'}` of a finished stage of this workdir."""
    return checkpoints.restore_model(self.stage_dir(stage_name),
                                     self.init_variables(role))[0]

  @functools.lru_cache(maxsize=None)
  def _eval_classify(self, model):
    return jax.jit(functools.partial(train.eval_classify_step, model.apply))

  @functools.lru_cache(maxsize=None)
  def _eval_fsp(self, model):
    pairs, weights, pool = fsp_settings(self.config, len(self.models["student"].widths) + 1)
    return jax.jit(functools.partial(
        train.eval_fsp_step, model.apply, teacher_apply=self.models["teacher"].apply,
        fsp_pairs=pairs, fsp_weights=weights, pool=pool))

  def teacher_fsp_cache(self, stage: Stage):
    """`{'teacher_fsp': matrices}`: the frozen teacher's FSP matrices of every training
    example (host float32, one `(N, m, n)` array per pair), gathered into each batch by
    the input pipeline; None unless `config.fsp.cache_teacher` and `stage` is stage 1.

    The teacher is in inference mode, so an example's matrices depend on the example
    only, never on the rest of its batch: with un-augmented inputs they are the same
    every epoch and computing them once gives the loss that recomputing them gives.
    """
    if stage.kind != "fsp" or not self.config.fsp.get("cache_teacher", False):
      return None
    ds, bs = self.dataset, self.config.eval_batch_size
    pairs, _, pool = fsp_settings(self.config, len(self.models["student"].widths) + 1)
    fn = train.jit_teacher_fsp(self.models["teacher"].apply, pairs, pool)
    teacher = self.teacher_variables()
    shapes = jax.eval_shape(fn, teacher, jax.ShapeDtypeStruct(
        (bs,) + tuple(ds.image_shape), jnp.uint8), self.mean, self.std)
    nbytes = len(ds.train_labels) * sum(int(np.prod(s.shape[1:])) for s in shapes) * 4
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.8 * available:
      raise ValueError(
          f"config.fsp.cache_teacher=True needs {nbytes / 2**30:.1f} GiB of host memory "
          f"for the teacher's FSP matrices, but only {available / 2**30:.1f} GiB are "
          "free. Set --config.fsp.cache_teacher=False (the teacher is then recomputed "
          "every step).")
    log.info("[%s] caching the teacher's FSP matrices of the %d training examples "
             "(%.2f GiB on the host).", stage.name, len(ds.train_labels), nbytes / 2**30)
    cache = data.map_examples(lambda images: fn(teacher, images, self.mean, self.std),
                              ds.train_images, self.mesh, bs)
    return {"teacher_fsp": cache}

  def make_train_step(self, stage: Stage):
    if stage.kind == "classify":
      step = train.jit_classify_step()
      return lambda state, batch: step(state, batch, self.mean, self.std)
    pairs, weights, pool = fsp_settings(self.config, len(self.models["student"].widths) + 1)
    step = train.jit_fsp_step(self.models["teacher"].apply, pairs, weights, pool)
    teacher = self.teacher_variables()
    return lambda state, batch: step(state, teacher, batch, self.mean, self.std)

  # ---- stages --------------------------------------------------------------------
  def run(self) -> Dict[str, Any]:
    results = read_results(self.workdir)
    for stage in self.stages:
      if stage.name in results:
        log.info("[%s] finished earlier (%s); skipping.", stage.name,
                 _summary(results[stage.name]))
        continue
      results[stage.name] = self.run_stage(stage)
      if jax.process_index() == 0:
        write_json(os.path.join(self.workdir, RESULTS), results)
    return results

  def run_stage(self, stage: Stage) -> Dict[str, Any]:
    cfg, sched = self.config, stage.schedule
    stage_dir = self.stage_dir(stage.name)
    fingerprint = _fingerprint(cfg, stage)
    info = checkpoints.read_stage_info(stage_dir)
    if info is not None and info.get("fingerprint") != fingerprint:
      raise ValueError(
          f"{stage_dir} holds a different experiment's stage {stage.name!r} (its config "
          "differs from this one); use a new --workdir, or delete that directory to "
          "start the stage over.")
    wall_before = info.get("wall_time_s", 0.0) if info else 0.0

    model = self.models[stage.role]
    variables = self.init_variables(stage.role)
    if stage.init_from:
      init_dir = (stage.init_from if os.path.isabs(stage.init_from)
                  else self.stage_dir(stage.init_from))
      variables, from_step = checkpoints.restore_model(
          init_dir, variables, f"stage-1 checkpoint {init_dir!r}")
      log.info("[%s] starts from stage %r's weights (its step %d).", stage.name,
               stage.init_from, from_step)
    lr_fn = train.create_learning_rate_fn(sched.learning_rates, sched.boundaries)
    tx = train.create_optimizer(lr_fn, sched.momentum, sched.weight_decay)
    state = jax.jit(lambda v: train.create_train_state(model, v, tx),
                    out_shardings=self.replicated)(variables)

    mngr = checkpoints.manager(stage_dir, cfg.max_checkpoints_to_keep)
    start = mngr.latest_step() or 0
    if start:
      state = checkpoints.restore_state(mngr, start, state)
      log.info("[%s] resumes from its checkpoint at step %d.", stage.name, start)
    if jax.process_index() == 0:
      checkpoints.write_stage_info(stage_dir, {"fingerprint": fingerprint,
                                               "wall_time_s": wall_before})
    metrics = MetricsWriter(os.path.join(stage_dir, "metrics.jsonl"), start)
    step_fn = self.make_train_step(stage)

    total = sched.num_steps
    eval_every = sched.get("eval_every", -1)
    eval_every = cfg.eval_every if eval_every < 0 else eval_every
    log.info("[%s] %s of %s (%s), steps %d..%d, batch %d.", stage.name, stage.kind,
             cfg[stage.role].model, stage.role, start, total, sched.batch_size)
    old_handler = (signal.signal(signal.SIGTERM, self._on_sigterm)
                   if _main_thread() else None)
    t_stage = time.time()
    t_log, step_log = time.time(), start
    last_saved = start
    try:
      batches = data.train_batches(self.dataset, self.mesh, sched.batch_size, cfg.seed,
                                   start, total, augment=sched.augment,
                                   pad=cfg.data.pad, flip=cfg.data.flip,
                                   extras=self.teacher_fsp_cache(stage))
      step_metrics = None
      for step, batch in batches:
        state, step_metrics = step_fn(state, batch)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
          m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          if not np.isfinite(m["loss"]):
            raise FloatingPointError(
                f"[{stage.name}] loss became {m['loss']} at step {done}; the last good "
                f"checkpoint (step {last_saved}) is kept. Lower the learning rate.")
          now = time.time()
          ips = (done - step_log) * sched.batch_size / max(now - t_log, 1e-9)
          eta = (total - done) * sched.batch_size / max(ips, 1e-9)
          lr = float(lr_fn(done - 1))
          log.info("[%s] step %d/%d loss %.4g %.0f img/s ETA %s", stage.name, done,
                   total, m["loss"], ips, _hms(eta))
          metrics.write({"step": done, "learning_rate": lr, "images_per_s": ips, **m})
          t_log, step_log = now, done
        if eval_every and done % eval_every == 0 and done != total:
          metrics.write({"step": done, **self.evaluate(stage, state.variables)})
        if done % cfg.checkpoint_every == 0 or done == total or self._sigterm:
          checkpoints.save(mngr, done, state)
          last_saved = done
          self._record_wall(stage_dir, fingerprint, wall_before + time.time() - t_stage)
        if self._sigterm:
          mngr.wait_until_finished()
          raise Preempted(f"[{stage.name}] SIGTERM: checkpoint at step {done} saved.")
      if last_saved != total:  # e.g. resumed at the final step.
        checkpoints.save(mngr, total, state)
      mngr.wait_until_finished()
    finally:
      mngr.close()
      if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    final = self.evaluate(stage, state.variables)
    wall = wall_before + time.time() - t_stage
    self._record_wall(stage_dir, fingerprint, wall)
    metrics.write({"step": total, **final})
    result = {"kind": stage.kind, "model": cfg[stage.role].model, "steps": total,
              "wall_time_s": round(wall, 1), **final}
    log.info("[%s] done: %s", stage.name, _summary(result))
    if stage.name == "teacher":
      self._teacher_variables = state.variables
    return result

  def _record_wall(self, stage_dir, fingerprint, wall):
    if jax.process_index() == 0:
      checkpoints.write_stage_info(stage_dir, {"fingerprint": fingerprint,
                                               "wall_time_s": wall})

  def _on_sigterm(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint after this step, then exiting.")
    self._sigterm = True


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
  return (f"test FSP loss {result.get('test_fsp_loss', float('nan')):.4g} after "
          f"{result['steps']} steps, {result['wall_time_s']:.0f} s")


def results_table(results: Dict[str, Any]) -> str:
  """A small text table: each classification stage's final test accuracy."""
  labels = {"teacher": "teacher", "teacher_short": "teacher, student's schedule",
            "scratch": "student from scratch", "student": "FSP student (stage 2)"}
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
