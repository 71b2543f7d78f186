"""Speed of the real training steps, and a side-by-side comparison with PyTorch.

    python benchmarks/bench.py --teacher_depth 26 --student_depth 8 --batch_size 128
    python benchmarks/bench.py --input_pipeline
    python benchmarks/bench.py --compare --repeats 5

The default prints one JSON object with the keys of the PyTorch peer
(`benchmarks/torch_reference.py`): images per second of each step (median over
`--steps` timed steps after `--warmup`, the steps taking turns), `fsp_over_main`, plus
what the peer lacks:

  main             student classify step (cross-entropy), what stage 2 runs
  fsp              stage-1 step: teacher forward + student FSP loss + update
  teacher          teacher classify step (training the teacher)
  teacher_forward  the teacher's share of an FSP step alone (forward + FSP matrices)
  fsp_cached       stage-1 step with the teacher's FSP matrices cached per example

The steps are training's own (`fsp_jax.train.jit_train_step`, what
`train.train_and_evaluate` runs: same functions, same jit options, state donated,
batch sharded over all devices),
timed after compilation with each step's results blocked on. Peak memory per step is
XLA's buffer assignment for the compiled step (arguments + outputs + temporaries).

`--compare` times the same steps in this process and the PyTorch peer's steps in
worker processes (`benchmarks/torch_worker.py`, one per PyTorch setting), taking turns
every `--steps` steps for `--repeats` rounds, and prints the per-step ratio jax/torch
(images per second) against the best PyTorch setting of each round.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_REFERENCE = os.path.join(HERE, "torch_reference.py")
TORCH_WORKER = os.path.join(HERE, "torch_worker.py")
STEPS = ("main", "fsp", "teacher")
# PyTorch settings tried in --compare: name -> (extra flags, extra environment).
# OMP_WAIT_POLICY=PASSIVE stops idle OpenMP threads spinning, which helps PyTorch a
# lot on a loaded machine; it is PyTorch's to win, so it counts as one of its settings.
TORCH_SETTINGS = {
    "nchw": ([], {}),
    "channels_last": (["--channels_last"], {}),
    "channels_last_passive": (["--channels_last"], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher_depth", type=int, default=26)
  p.add_argument("--student_depth", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--width_multiplier", type=int, default=1)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--only", default=",".join(STEPS + ("teacher_forward", "fsp_cached")),
                 help="comma-separated steps to time")
  p.add_argument("--steps_per_call", type=int, default=1,
                 help="training steps per jitted call (lax.scan), as config.steps_per_call")
  p.add_argument("--num_seeds", type=int, default=1,
                 help="seeds trained side by side in one program, as config.num_seeds")
  p.add_argument("--seed_axis", default="auto", choices=("auto", "vmap", "unrolled"),
                 help="how several seeds share the program, as config.seed_axis")
  p.add_argument("--half_precision", action="store_true",
                 help="bfloat16 activations, as config.half_precision")
  p.add_argument("--input_pipeline", action="store_true",
                 help="measure the input pipeline's images/s instead of the steps")
  p.add_argument("--loop", action="store_true",
                 help="time whole training loops (input pipeline, dispatch, step) on a "
                      "synthetic 50k CIFAR-sized set: host pipeline one step per call "
                      "vs --steps_per_call K with the host and the device pipeline")
  p.add_argument("--loop_steps", type=int, default=64, help="timed steps per --loop mode")
  p.add_argument("--compare", action="store_true",
                 help="alternate with the PyTorch peer and print jax/torch ratios")
  p.add_argument("--repeats", type=int, default=5, help="rounds of --compare")
  p.add_argument("--torch_reference", default=TORCH_REFERENCE)
  p.add_argument("--torch_settings", default=",".join(TORCH_SETTINGS))
  p.add_argument("--methods", default="",
                 help="time every one of these methods' training steps instead "
                      "(comma-separated rows of --config: method names, sums such as "
                      "crd+kd, and 'scratch'; 'zoo': the zoo's rows); the table's "
                      "batch unless --batch_size is given")
  p.add_argument("--config", default="cifar10_zoo",
                 help="the config whose models, batch and methods --methods times")
  args = p.parse_args(argv)
  args.batch_size_given = any(a == "--batch_size" or a.startswith("--batch_size=")
                              for a in (sys.argv[1:] if argv is None else argv))
  if args.methods == "zoo":
    from fsp_jax.configs import cifar10_zoo
    args.methods = ",".join(("scratch",) + cifar10_zoo.METHODS)
  return args


# ---- the JAX steps ---------------------------------------------------------------
class _Built(dict):
  """`{name: (fn, state, args)}` built on first access by `builders[name]()`; each
  built step's state also goes into `states`."""

  def __init__(self, builders, states):
    super().__init__()
    self.builders, self.states = builders, states

  def __missing__(self, name):
    entry = self[name] = self.builders[name]()
    self.states[name] = entry[1]
    return entry


class Steps:
  """The compiled pipeline steps on one synthetic batch, ready to be timed."""

  def __init__(self, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fsp_jax import data, fsp, methods, models, train
    self.jax = jax
    self.batch_size = args.batch_size
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)}
    self.batch = data.to_global(host, mesh)

    def network(depth):
      dtype = jnp.bfloat16 if args.half_precision else jnp.float32
      return models.Network(models.create_model(
          f"cifar_resnet{depth}", args.num_classes, args.width_multiplier, dtype),
          (120.0,) * 3, (64.0,) * 3)
    teacher, student = network(args.teacher_depth), network(args.student_depth)
    tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 1e-4)
    k, n = args.steps_per_call, args.num_seeds
    self.images_per_call = args.batch_size * k * n  # Seed-images.

    def state(net, seed):
      one = lambda s: train.create_train_state(  # noqa: E731
          net, net.init(jax.random.PRNGKey(s), (32, 32, 3)), tx)
      st = one(seed) if n == 1 else jax.tree.map(
          lambda *xs: jnp.stack(xs), *[one(seed + i) for i in range(n)])
      return jax.device_put(st, replicated)

    # Built on first use (`fns` below): a run of some steps builds only their states.
    teacher_variables = functools.cache(lambda: jax.device_put(
        teacher.init(jax.random.PRNGKey(0), (32, 32, 3)), replicated))
    # Training's own jitted steps (what `train.train_and_evaluate` runs).
    distiller = methods.FSP(fsp.default_fsp_pairs(student.feature_names))
    teacher_fsp = train.jit_teacher_targets(teacher, distiller)

    @functools.cache
    def cached_batch():
      return dict(self.batch, teacher_targets=teacher_fsp(teacher_variables(),
                                                          self.batch["image"]))
    if k == 1 and n == 1:
      fsp_step = train.jit_train_step(student, teacher, distiller, use_labels=False)
      main, teach = train.jit_train_step(student), train.jit_train_step(teacher)
      plain, cached = (lambda: self.batch), cached_batch
      extra = ()
    else:
      # K steps of N seeds a call: the batch repeated along (K, [N]) leading axes.
      lead = (k,) + ((n,) if n > 1 else ())
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          *((None,) * len(lead)), "data"))

      def stacked(tree):
        return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(
            x, lead + x.shape), sharding), tree)
      ax = args.seed_axis
      fsp_step = train.jit_train_steps(student, teacher, distiller, False, n, None, ax)
      main = train.jit_train_steps(student, None, None, True, n, None, ax)
      teach = train.jit_train_steps(teacher, None, None, True, n, None, ax)
      plain = functools.cache(lambda: stacked(self.batch))
      cached = functools.cache(lambda: stacked(cached_batch()))
      extra = (None,)
    # name -> () -> (jitted fn, state or None, other args); each step maps state ->
    # state.
    builders = {
        "main": lambda: (main, state(student, 1), (plain(), None) + extra),
        "fsp": lambda: (fsp_step, state(student, 1),
                        (plain(), teacher_variables()) + extra),
        "teacher": lambda: (teach, state(teacher, 0), (plain(), None) + extra),
        "teacher_forward": lambda: (teacher_fsp, None,
                                    (teacher_variables(), self.batch["image"])),
        "fsp_cached": lambda: (fsp_step, state(student, 1), (cached(), None) + extra),
    }
    self.states = {}
    self.fns = _Built(builders, self.states)

  def memory(self, name) -> Dict[str, float]:
    """XLA's buffer assignment of the compiled step, in MB."""
    fn, st, args = self.fns[name]
    lowered = fn.lower(*args) if st is None else fn.lower(st, *args)
    compiled = lowered.compile()  # Once, for both analyses.
    m = compiled.memory_analysis()
    if m is None:
      return {}
    mb = 1 / 2**20
    out = {"peak_mb": round((m.argument_size_in_bytes + m.output_size_in_bytes
                             - m.alias_size_in_bytes + m.temp_size_in_bytes) * mb, 1),
           "temp_mb": round(m.temp_size_in_bytes * mb, 1)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):  # XLA's count for the whole call, all seeds.
      out["gflop_per_call"] = round(float(cost["flops"]) / 1e9, 3)
    return out

  def run_once(self, name) -> float:
    """One step, blocked on; returns its wall time in seconds."""
    fn, st, args = self.fns[name]
    t0 = time.perf_counter()
    if st is None:
      out = fn(*args)
    else:
      out = fn(self.states[name], *args)
      self.states[name] = out[0]
    self.jax.block_until_ready(out)
    return time.perf_counter() - t0


def run_jax(args, steps: Steps = None) -> Dict:
  import jax

  from fsp_jax.train import resolve_seed_axis
  steps = steps or Steps(args)
  names = [n for n in args.only.split(",") if n]
  for n in names:  # Compilation and warm-up.
    for _ in range(args.warmup):
      steps.run_once(n)
  # Round robin, so that ratios between steps (fsp_over_main, ...) compare steps timed
  # seconds apart, under the same load.
  samples = {n: [] for n in names}
  for _ in range(args.steps):
    for n in names:
      samples[n].append(steps.run_once(n))
  times = {n: statistics.median(samples[n]) for n in names}
  out = {"framework": f"jax {jax.__version__}", "backend": jax.default_backend(),
         "devices": jax.device_count(), "threads": os.cpu_count(),
         "batch_size": args.batch_size, "teacher_depth": args.teacher_depth,
         "student_depth": args.student_depth}
  out.update(steps_per_call=args.steps_per_call, num_seeds=args.num_seeds,
             seed_axis=resolve_seed_axis(args.seed_axis),
             half_precision=args.half_precision)
  for n, t in times.items():
    # Images of every seed (seed-images) per second; the teacher's forward pass alone
    # runs one batch.
    per_call = args.batch_size if n == "teacher_forward" else steps.images_per_call
    out[f"{n}_images_per_s"] = round(per_call / t, 1)
  if "fsp" in times and "main" in times:
    out["fsp_over_main"] = round(times["fsp"] / times["main"], 3)
  if {"fsp", "main", "teacher_forward"} <= set(times) and steps.images_per_call == (
      args.batch_size):
    # FSP matrices and loss nearly free: fsp ~ teacher forward + student step.
    out["fsp_over_teacher_forward_plus_main"] = round(
        times["fsp"] / (times["teacher_forward"] + times["main"]), 3)
  if {"fsp_cached", "main"} <= set(times):
    # With the teacher's matrices cached, stage 1 should cost about a student step.
    out["fsp_cached_over_main"] = round(times["fsp_cached"] / times["main"], 3)
  out["memory"] = {n: steps.memory(n) for n in names}
  out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return out


def _synthetic_dataset(n: int = 50000):
  """A CIFAR-sized training set in host memory: `n` random uint8 32x32x3 images."""
  import numpy as np

  from fsp_jax import data
  rng = np.random.default_rng(0)
  return data.Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.int32),
                      np.zeros((8, 32, 32, 3), np.uint8), np.zeros((8,), np.int32), 10,
                      np.zeros(3, np.float32), np.ones(3, np.float32), "synthetic")


# ---- whole loops --------------------------------------------------------------------
def run_loop(args) -> Dict:
  """Seconds per step and seed-images/s of the training loop as `train_and_evaluate`
  runs it (input pipeline, dispatch, student classify step; no logging or
  checkpoints), on a synthetic CIFAR-sized set, three ways: the host pipeline one step
  per call; the host pipeline K steps per call; the device pipeline K steps per call.
  `--num_seeds` applies to all three. Host overhead per step = loop time per step -
  the step's own time (the fixed-batch bench)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fsp_jax import data, models, train
  ds = _synthetic_dataset()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  net = models.Network(models.create_model(f"cifar_resnet{args.student_depth}", 10,
                                           args.width_multiplier), (120.0,) * 3,
                       (64.0,) * 3)
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 1e-4)
  seeds = list(range(args.num_seeds))

  one = lambda s: train.create_train_state(  # noqa: E731
      net, net.init(jax.random.PRNGKey(s), (32, 32, 3)), tx)
  device_data = data.device_train_data(ds, mesh)  # Uploaded once, as a stage does.
  initial = jax.device_put(one(0) if len(seeds) == 1 else jax.tree.map(
      lambda *xs: np.stack(xs), *[one(s) for s in seeds]), replicated)

  def host_one(total, state):
    step = train.jit_train_step(net)
    if len(seeds) > 1:
      step = train.jit_train_steps(net, None, None, True, len(seeds), None,
                                   args.seed_axis)
    if len(seeds) == 1:
      for _, batch in data.train_batches(ds, mesh, args.batch_size, 0, 0, total):
        state, m = step(state, batch, None)
    else:
      for _, _, inputs in data.train_calls(ds, mesh, args.batch_size, seeds,
                                           data.call_ranges(0, total, 1)):
        state, m = step(state, inputs, None, None)
    jax.block_until_ready(m)

  def calls(total, device, state):
    # `data.device_train_batch`'s keyword arguments: the paper's augmentation.
    device_batch = (data.Augment(), mesh) if device else None
    steps = train.jit_train_steps(net, None, None, True, len(seeds), device_batch,
                                  args.seed_axis)
    train_data = device_data if device else None
    for _, _, inputs in data.train_calls(
        ds, mesh, args.batch_size, seeds,
        data.call_ranges(0, total, args.steps_per_call), device=device):
      state, m = steps(state, inputs, None, train_data)
    jax.block_until_ready(m)

  modes = {"host_1_step_per_call": host_one,
           f"host_{args.steps_per_call}_steps_per_call":
               lambda t, st: calls(t, False, st),
           f"device_{args.steps_per_call}_steps_per_call":
               lambda t, st: calls(t, True, st)}
  # Every call starts from the same initial state, copied outside the timing (the
  # steps donate it); initialising is no part of the loop.
  fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, initial))  # noqa: E731
  out = {"loop": "student classify steps on synthetic 50000 x 32x32x3",
         "framework": f"jax {jax.__version__}", "backend": jax.default_backend(),
         "devices": jax.device_count(), "batch_size": args.batch_size,
         "student_depth": args.student_depth, "num_seeds": args.num_seeds,
         "steps_per_call": args.steps_per_call, "timed_steps": args.loop_steps,
         "repeats": args.repeats, "modes": {}}
  for fn in modes.values():
    fn(2 * args.steps_per_call, fresh())  # Compile every call shape.
  samples = {name: [] for name in modes}
  for _ in range(args.repeats):  # Round robin: every mode under the same load.
    for name, fn in modes.items():
      state = fresh()
      t0 = time.perf_counter()
      fn(args.loop_steps, state)
      samples[name].append(time.perf_counter() - t0)
  for name, ts in samples.items():
    t = statistics.median(ts) / args.loop_steps
    out["modes"][name] = {"ms_per_step": round(1e3 * t, 3),
                          "seed_images_per_s": round(
                              args.batch_size * len(seeds) / t, 1)}
  return out


# ---- every method's steps (--methods) -------------------------------------------------
def method_stages(args):
  """`{stage name: (StageSetup, method name or 'scratch')}`: every stage after the
  teacher of `args.config` with `config.methods` = the --methods rows (scratch the
  baseline), resolved as training resolves them (`fsp_jax.stages.resolve`), on a
  synthetic CIFAR-sized training set, every stage starting from random weights."""
  import dataclasses as dc
  import tempfile

  import ml_collections

  from fsp_jax import config_lib, stages
  config = config_lib.load(args.config)
  rows = [r for r in args.methods.split(",") if r]
  config.methods = tuple(r for r in rows if r != "scratch")
  config.baselines = ("scratch",) if "scratch" in rows else ()
  config.num_seeds, config.seed_axis = args.num_seeds, args.seed_axis
  config.steps_per_call, config.data.pipeline = 1, "host"
  config.teacher.checkpoint = "(random weights: speed only)"  # No teacher stage.
  if args.batch_size_given:  # Every stage's batch (the student's, each stage 1's).
    for key in config:
      if isinstance(config[key], ml_collections.ConfigDict) and "schedule" in config[key]:
        config[key].schedule.batch_size = args.batch_size
  dataset = _synthetic_dataset()
  planned = stages.plan_stages(config)
  exp = stages.Experiment(config, tempfile.mkdtemp(prefix="bench_methods_"),
                          tuple(planned), dataset, stages.mesh_of_all_devices(),
                          {role: stages.build_network(config, role, dataset)
                           for role in ("teacher", "student")})
  out = {}
  for stage in planned:
    # Random weights where training would restore a stage 1's: the same step.
    stage = dc.replace(stage, init_from=None, params_from=None)
    setup = stages.resolve(exp, stage)
    random_teacher = lambda: stages.random_variables(exp, "teacher")  # noqa: E731
    out[stage.name] = (dc.replace(
        setup, teacher_variables=random_teacher if setup.teacher_variables else None),
        stage.method or stage.name)
  return out


def run_methods(args) -> Dict:
  """Seed-images/s of every method's training steps, built as training builds them
  (`fsp_jax.train.initial_state` and `step_call`: the teacher's forward pass, the
  method's own parameters, state and frozen parts included), each timed on one fixed
  batch of its own feed, the steps taking turns (median of `--steps` after
  `--warmup`). `step_over_kd`: a stage's time over KD's main-task step."""
  import jax

  from fsp_jax import train
  steps = {}
  for name, (stage, row) in method_stages(args).items():
    teacher = stage.teacher_variables() if stage.teacher_variables else None
    run_call = train.step_call(stage, teacher)
    extras = train.example_extras(stage)
    _, _, inputs = next(iter(stage.feed.calls(0, 1, extras=extras)))
    steps[name] = [run_call, train.initial_state(stage), inputs, row, stage]

  def once(name):
    run_call, state, inputs, _, _ = steps[name]
    t0 = time.perf_counter()
    state, m = run_call(state, inputs)
    jax.block_until_ready((state, m))
    steps[name][1] = state
    return time.perf_counter() - t0

  for name in steps:
    for _ in range(max(1, args.warmup)):
      once(name)
  samples = {name: [] for name in steps}
  for _ in range(args.steps):
    for name in steps:
      samples[name].append(once(name))
  times = {name: statistics.median(ts) for name, ts in samples.items()}
  out = {"methods": "every method's training steps (fsp_jax.train.step_call)",
         "config": args.config, "framework": f"jax {jax.__version__}",
         "backend": jax.default_backend(), "devices": jax.device_count(),
         "num_seeds": args.num_seeds, "steps": {}}
  kd = times.get("kd")
  for name, t in times.items():
    _, _, _, row, stage = steps[name]
    images = stage.feed.batch_size * len(stage.seeds)
    out["steps"][name] = {
        "method": row, "kind": stage.kind, "batch_size": stage.feed.batch_size,
        "ms_per_step": round(1e3 * t, 2), "seed_images_per_s": round(images / t, 1),
        **({"step_over_kd": round(t / kd, 3)} if kd else {})}
  return out


# ---- the input pipeline ----------------------------------------------------------
def run_input_pipeline(args, num_batches: int = 200) -> Dict:
  """Images/s of `data.train_batches` on a CIFAR-sized in-memory data set (50k)."""
  import jax
  import numpy as np

  from fsp_jax import data
  ds = _synthetic_dataset()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  out = {"input_pipeline": "data.train_batches, synthetic 50000 x 32x32x3 uint8",
         "batch_size": args.batch_size}
  # CIFAR-100 4x widths: the teacher's cached FSP matrices, 176 KiB per example. Filled
  # (not zeros, whose pages the OS maps to one zero page), over 10,000 examples (1.7
  # GiB, far beyond the caches) rather than 50,000 (9 GiB).
  m = 10000
  cache = tuple(np.full((m,) + shape, 1.5, np.float32)
                for shape in ((64, 64), (64, 128), (128, 256)))
  small = dataclasses.replace(ds, train_images=ds.train_images[:m],
                              train_labels=ds.train_labels[:m])
  none = data.Augment.none()
  cases = {"augment": (ds, dict(augment=data.Augment())),
           "no_augment": (ds, dict(augment=none)),
           "no_augment_cached_fsp_4x": (small, dict(augment=none,
                                                    extras={"teacher_targets": cache}))}
  for name, (dset, kw) in cases.items():
    it = data.train_batches(dset, mesh, args.batch_size, 0, 0, num_batches + 5, **kw)
    for _ in range(5):  # Fill the prefetch queue, start the thread.
      jax.block_until_ready(next(it)[1])
    t0 = time.perf_counter()
    for _, batch in it:
      jax.block_until_ready(batch)
    out[f"{name}_images_per_s"] = round(num_batches * args.batch_size /
                                        (time.perf_counter() - t0), 1)
  return out


# ---- comparison with PyTorch -----------------------------------------------------
class TorchWorker:
  """The PyTorch peer's steps in a subprocess (benchmarks/torch_worker.py)."""

  def __init__(self, args, setting: str):
    flags, env = TORCH_SETTINGS[setting]
    cmd = [sys.executable, TORCH_WORKER, "--teacher_depth", str(args.teacher_depth),
           "--student_depth", str(args.student_depth), "--batch_size",
           str(args.batch_size), "--reference", args.torch_reference] + flags
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, **env})
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the PyTorch worker failed to start: {' '.join(cmd)}")
    self.info = json.loads(line)

  def run(self, step: str, n: int) -> List[float]:
    self.proc.stdin.write(json.dumps({"step": step, "n": n}) + "\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())["times"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def _spread(xs: List[float]) -> Dict[str, float]:
  return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
          "max": round(max(xs), 3)}


def compare(args) -> Dict:
  """JAX (this process) and each PyTorch setting (one worker process each) take turns,
  `args.steps` timed steps per turn, each turn after one untimed step; `args.repeats`
  rounds, the order rotating every round. Idle sides sleep on a pipe, so each turn
  runs alone on the machine, and turns seconds apart see about the same load."""
  settings = [s for s in args.torch_settings.split(",") if s]
  unknown = set(settings) - set(TORCH_SETTINGS)
  if unknown:
    raise SystemExit(f"unknown --torch_settings {sorted(unknown)}; choose from "
                     f"{sorted(TORCH_SETTINGS)}.")
  if not os.path.exists(args.torch_reference):
    raise SystemExit(f"PyTorch peer {args.torch_reference} not found; pass "
                     "--torch_reference PATH.")
  import jax
  steps = Steps(args)
  workers = {s: TorchWorker(args, s) for s in settings}
  runners = {"jax": lambda name, n: [steps.run_once(name) for _ in range(n)]}
  runners.update({s: w.run for s, w in workers.items()})
  for name in STEPS:  # Compilation and warm-up, untimed.
    for run in runners.values():
      run(name, args.warmup)
  sides = list(runners)
  rounds = []
  try:
    for r in range(args.repeats):
      rnd = {"round": r, "load_avg_1min": round(os.getloadavg()[0], 2),
             "images_per_s": {}, "ratio_vs_best_torch": {}, "best_torch_setting": {}}
      for name in STEPS:
        ips = {}
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
          runners[side](name, 1)
          ips[side] = args.batch_size / statistics.median(runners[side](name, args.steps))
        best = max(settings, key=ips.get)
        rnd["images_per_s"][name] = {k: round(v, 1) for k, v in ips.items()}
        rnd["ratio_vs_best_torch"][name] = round(ips["jax"] / ips[best], 3)
        rnd["best_torch_setting"][name] = best
      rounds.append(rnd)
      print(json.dumps(rnd), file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.close()
  summary = {"framework": f"jax {jax.__version__} vs {workers[settings[0]].info['framework']}",
             "batch_size": args.batch_size, "teacher_depth": args.teacher_depth,
             "student_depth": args.student_depth, "rounds": args.repeats,
             "steps_per_turn": args.steps, "torch_settings": settings,
             "ratio_jax_over_best_torch": {}, "ratio_jax_over_torch_setting": {},
             "images_per_s": {}}
  for name in STEPS:
    summary["ratio_jax_over_best_torch"][name] = _spread(
        [r["ratio_vs_best_torch"][name] for r in rounds])
    summary["images_per_s"][name] = {
        side: _spread([r["images_per_s"][name][side] for r in rounds]) for side in sides}
    summary["ratio_jax_over_torch_setting"][name] = {
        s: _spread([r["images_per_s"][name]["jax"] / r["images_per_s"][name][s]
                    for r in rounds]) for s in settings}
  summary["load_avg_1min"] = _spread([r["load_avg_1min"] for r in rounds])
  return summary


def main(argv=None):
  args = parse_args(argv)
  if args.input_pipeline:
    out = run_input_pipeline(args)
  elif args.loop:
    out = run_loop(args)
  elif args.compare:
    out = compare(args)
  elif args.methods:
    out = run_methods(args)
  else:
    out = run_jax(args)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
