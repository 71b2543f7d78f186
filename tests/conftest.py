"""Test setup: four fake CPU devices, so every test also exercises data parallelism."""
import os

# Must be set before jax is imported anywhere in the test session.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are small and run a few steps each: XLA's compile time is most
# of the suite's, and LLVM's optimisation passes most of that. Level 1 without the
# expensive passes compiles faster than the default level 2 (the GPU script's dry-run
# bench: 54 s against 68 s) to the same results up to float rounding (speed is
# measured by benchmarks/, never here); level 0 compiled ~5 % faster again but ran a
# step ~1.7x slower, a step inside a lax.scan ~6x slower (the whole suite side by side
# on 2 cores: 648 s at level 0, 622 s at level 1). A level set by the caller is kept.
# (XLA:CPU's older loop emitters, --xla_cpu_use_fusion_emitters=false, would cut the
# compile time by another ~40 % but round differently from one program to the next:
# the tests that compare two programs' training fail with them. `quick_compile` below
# gives them to the subprocesses of tests that compare no two programs.)
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=1"
                              " --xla_llvm_disable_expensive_passes=true")
# One persistent compilation cache for the whole test session, its worker processes
# (pytest-xdist, which inherit this environment) and the command-line subprocesses
# the tests start: a program compiled once (the smoke config's steps, evaluations,
# the same ResNet-8s in many tests) is loaded, not compiled again. A cached
# executable computes exactly what a fresh compile gives.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE = tempfile.mkdtemp(prefix="fsp_jax_tests_jit_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TARBALL = os.path.join(os.path.dirname(REPO), "shared", "data",
                             "cifar10-images.tar.gz")


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
  """The real CIFAR-10 image folder, extracted once; skips where it is absent."""
  for candidate in (os.environ.get("FSP_CIFAR10_DIR", ""), "/tmp/cifar10"):
    if candidate and os.path.isdir(os.path.join(candidate, "train")):
      return candidate
  if not os.path.exists(CIFAR_TARBALL):
    pytest.skip("real CIFAR-10 not available (set FSP_CIFAR10_DIR or provide "
                "../shared/data/cifar10-images.tar.gz)")
  import tarfile
  out = tmp_path_factory.mktemp("cifar")
  with tarfile.open(CIFAR_TARBALL) as tar:
    tar.extractall(out, filter="data")
  return str(out / "cifar10")


def shared_dir(tmp_path_factory, name: str, build):
  """A folder made once for the whole test session by `build(path)`, shared by the
  pytest-xdist workers (one builds it under a lock, the others wait, then read it):
  for runs that several tests only read. `build` must succeed or raise."""
  import fcntl

  base = tmp_path_factory.getbasetemp()
  # Under pytest-xdist each worker's folder is in the session's; in one process the
  # session's folder is the base itself (its parent outlives the session).
  session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = session / f"shared_{name}"
  root.mkdir(exist_ok=True)
  with open(root / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / ".built").exists():
      build(root / "dir")
      (root / ".built").write_text("")
  return root / "dir"


@pytest.fixture(scope="session")
def smoke_teacher(tmp_path_factory):
  """A trained `quickstart:smoke` teacher's stage folder, trained once for the session,
  for tests whose subject is what comes after the teacher."""
  def build(workdir):
    from fsp_jax import config_lib, train
    config = config_lib.load("quickstart:smoke")
    config.teacher_only = True
    train.run(config, str(workdir))
  return str(shared_dir(tmp_path_factory, "smoke_teacher", build) / "teacher")


def with_devices(env, n):
  """`env` with XLA faking `n` CPU devices (for a subprocess)."""
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(env, XLA_FLAGS=" ".join(flags + [
      f"--xla_force_host_platform_device_count={n}"]))


def quick_compile(env):
  """`env` with XLA:CPU's older loop emitters (`--xla_cpu_use_fusion_emitters=false`),
  which compile ~40 % faster, for command-line runs that show a run goes through (the
  every-method run: 108 s -> 64 s of CPU) or that compare runs all made with it (kill
  and resume, several processes: test_reliability, test_seeds; 199 s -> 182 s for
  those with test_examples). Never where a run is compared with one made without it,
  and not for the in-process tests: the two emitters round differently, and 12 of the
  in-process comparisons of two programs fail with them at their tolerances. (Not for
  the GPU script's dry run either: its Table 1 FSP stage, whose Eq. 2 sums are ~1e7
  at initialisation, goes non-finite in 2 steps with them.)"""
  return dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                              " --xla_cpu_use_fusion_emitters=false").strip())


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  """Environment of command-line subprocesses: CPU, 2 devices, the session's compile
  cache (above), so that only the first run of a program compiles."""
  del tmp_path_factory
  return with_devices(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"), 2)


def checkpoint_accuracies(config, workdir, stage_name):
  """A classifier stage's test accuracy recomputed from its final checkpoint, apart
  from the training loop's evaluation: `(per_seed, ensemble, one)`, fractions, where
  `per_seed` has one entry per seed, `ensemble` is the mean softmax's accuracy and
  `one` is one test example's share (what a near-tie decided otherwise in batches of
  another size can move an accuracy by)."""
  import jax
  import numpy as np

  from fsp_jax import checkpoints, stages
  exp = stages.setup(config, str(workdir))
  stage = next(s for s in exp.stages if s.name == stage_name)
  network = exp.networks[stage.role]
  seeds = stages.stage_seeds(exp, stage)
  template = stages.random_variables(exp, stage.role, seeds)
  variables = checkpoints.restore_model(os.path.join(str(workdir), stage_name),
                                        template)[0]
  if len(seeds) == 1:
    variables = jax.tree.map(lambda x: x[None], variables)
  logits = jax.jit(lambda v, x: network.apply(v, x)[0])
  images, labels = exp.dataset.test_images, exp.dataset.test_labels
  probs = [np.asarray(jax.nn.softmax(logits(jax.tree.map(lambda x: x[k], variables),
                                            images)), np.float64)
           for k in range(len(seeds))]
  per_seed = [float(np.mean(p.argmax(-1) == labels)) for p in probs]
  ensemble = float(np.mean(np.mean(probs, 0).argmax(-1) == labels))
  return per_seed, ensemble, 1.0 / len(labels)


def pytest_unconfigure(config):
  """The session's compilation cache is removed by the process that made it."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Test files whose tests take longest (whole pipelines, subprocesses), run first so that
# the workers (pytest-xdist) finish together instead of one waiting on a late long test.
LONGEST_FIRST = ("test_gpu_script.py", "test_zoo.py", "test_seeds.py", "test_reliability.py",
                 "test_fsp_cache.py", "test_experiment.py", "test_examples.py",
                 "test_notebook.py", "test_registry.py", "test_plots.py", "test_bench.py")


# The runs several tests of a file read (`shared_dir`), by fixture name: the tests
# that read one go to the same worker (pytest-xdist's loadgroup), so no other worker
# waits on its lock while it is built.
SHARED_RUNS = {"test_zoo.py": ("every_method_run",), "test_seeds.py": ("teacher",),
               "test_fsp_cache.py": ("tiny_teacher",), "test_plots.py": ("tiny_run",),
               "test_reliability.py": ("clean_run",)}


@pytest.hookimpl(tryfirst=True)  # Before pytest-xdist's, which reads the groups.
def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
  for item in items:
    for fixture in SHARED_RUNS.get(item.path.name, ()):
      if fixture in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group(f"{item.path.name}:{fixture}"))


def pytest_collection_finish(session):
  """Under pytest-xdist's loadgroup, says loudly where the groups above were not
  honoured (a pytest and pytest-xdist that do not work together): the suite then still
  passes, more slowly."""
  config = session.config
  if not getattr(config.option, "loadgroup", False):
    return
  lost = [item.nodeid for item in session.items
          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if lost:
    import warnings
    warnings.warn(pytest.PytestWarning(
        f"pytest-xdist ignored the xdist_group of {len(lost)} tests (e.g. {lost[0]}): "
        "the tests reading one shared run may wait on each other across workers; "
        "install the pytest that setup.cfg's test extras name."))


def write_run(workdir, name, results, curves=None):
  """A run directory as a run leaves it: `results.json`, and per stage the
  `metrics.jsonl` records in `curves` (`{stage: [record, ...]}`)."""
  import json
  run_dir = os.path.join(workdir, name)
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(results, f)
  for stage, records in (curves or {}).items():
    os.makedirs(os.path.join(run_dir, stage), exist_ok=True)
    with open(os.path.join(run_dir, stage, "metrics.jsonl"), "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
