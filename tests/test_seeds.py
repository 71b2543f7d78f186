"""Several steps per call, several seeds in one program, and the device-resident input:
the same training as one step, one seed and the host pipeline."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import checkpoint_accuracies, quick_compile, shared_dir
from fsp_jax import checkpoints, config_lib, data, stages, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = os.path.join(REPO, "tests", "fault_injection.py")


def smoke(**overrides):
  """quickstart:smoke without baselines, at learning rates 10x lower: at the smoke
  config's 0.1 on 32 examples a batch, float32 rounding differences between two
  compilations of the same step grow ~10x a step, and the comparisons below would
  measure that chaos instead of the programs' agreement."""
  config = config_lib.load("quickstart:smoke")
  config.baselines = ()
  config.teacher.schedule.learning_rates = (0.01, 0.001)
  config.student.schedule.learning_rates = (0.01, 0.001)
  config.fsp.schedule.learning_rates = (1e-4,)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def final_model(stage_dir, exp, role, seeds=1):
  template = stages.abstract_variables(exp, role)
  if seeds > 1:
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct((seeds,) + a.shape, a.dtype,
                                                           sharding=a.sharding), template)
  return jax.device_get(checkpoints.restore_model(str(stage_dir), template)[0])


def losses(stage_dir, key="loss"):
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    return [r[key] for r in map(json.loads, f) if key in r and "test_accuracy" not in r]


def close(a, b, rtol=1e-3, atol=1e-4):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_call_ranges_end_at_every_log_eval_and_checkpoint_step():
  assert data.call_ranges(0, 12, 4, (4,)) == [(0, 4), (4, 8), (8, 12)]
  assert data.call_ranges(3, 12, 4, (5, 0)) == [(3, 5), (5, 9), (9, 10), (10, 12)]
  assert data.call_ranges(0, 3, 8, ()) == [(0, 3)]
  assert data.call_ranges(6, 6, 4, (4,)) == []


def test_k_steps_per_call_equal_k_single_steps(tmp_path):
  one = train.run(smoke(log_every=1), str(tmp_path / "one"))
  many = train.run(smoke(log_every=1, steps_per_call=4), str(tmp_path / "many"))
  for name in ("teacher", "fsp", "student"):
    np.testing.assert_allclose(losses(tmp_path / "many" / name),
                               losses(tmp_path / "one" / name), rtol=1e-4)
    for key in ("test_accuracy", "test_fsp_loss"):
      if key in one[name]:
        np.testing.assert_allclose(many[name][key], one[name][key], rtol=1e-4)
  exp = stages.setup(smoke(), str(tmp_path / "one"))
  for name, role in (("teacher", "teacher"), ("student", "student")):
    close(final_model(tmp_path / "many" / name, exp, role),
          final_model(tmp_path / "one" / name, exp, role))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A trained smoke teacher's stage folder, shared by the tests here that compare
  students (each run below starts from it instead of training its own)."""
  workdir = shared_dir(tmp_path_factory, "seeds_teacher",
                       lambda d: train.run(smoke(teacher_only=True), str(d)))
  run = json.load(open(workdir / "results.json"))
  # At the 10x lower rates it scores 0.170 on the 359 test digits; chance is 0.1.
  assert run["teacher"]["test_accuracy"] > 0.14
  return str(workdir / "teacher")


def test_accelerator_loop_equals_the_cpu_loop(tmp_path, monkeypatch, teacher):
  """What GPUs and TPUs run (K steps in a lax.scan, seeds by vmap, the training set
  sharded over the devices) trains as the CPU's straight-line, unrolled steps do."""
  settings = {"data.pipeline": "device", "steps_per_call": 2, "num_seeds": 2,
              "teacher.checkpoint": teacher}
  cpu = train.run(smoke(**settings), str(tmp_path / "cpu"))
  monkeypatch.setattr(train, "rolled_loop", lambda: True)
  # The same teacher: the loops compared are the students'.
  accel = train.run(smoke(**settings, seed_axis="vmap"), str(tmp_path / "accel"))
  for name in ("fsp", "student"):
    np.testing.assert_allclose(losses(tmp_path / "accel" / name),
                               losses(tmp_path / "cpu" / name), rtol=1e-3)
  np.testing.assert_allclose(
      [s["test_accuracy"] for s in accel["student"]["per_seed"]],
      [s["test_accuracy"] for s in cpu["student"]["per_seed"]], atol=0.02)


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory, teacher):
  """`(workdir, results)` of a run of 3 seeds side by side, from the shared teacher,
  for the tests here that read it."""
  config = smoke(num_seeds=3, **{"teacher.checkpoint": teacher})
  workdir = shared_dir(tmp_path_factory, "three_seeds",
                       lambda d: train.run(config, str(d)))
  return workdir, json.load(open(workdir / "results.json"))


def test_seed_of_a_several_seed_run_equals_its_one_seed_run(tmp_path, teacher,
                                                            three_seeds):
  three_dir, three = three_seeds
  assert [p["seed"] for p in three["student"]["per_seed"]] == [0, 1, 2]
  exp3 = stages.setup(smoke(num_seeds=3, **{"teacher.checkpoint": teacher}),
                      str(three_dir))
  weights3 = final_model(three_dir / "student", exp3, "student", seeds=3)
  accs = []
  for seed in (1, 2):  # Seed 0 is the first of the three, 1 and 2 the next.
    run = train.run(smoke(seed=seed, **{"teacher.checkpoint": teacher}),
                    str(tmp_path / f"seed{seed}"))
    np.testing.assert_allclose(three["fsp"]["per_seed"][seed]["test_fsp_loss"],
                               run["fsp"]["test_fsp_loss"], rtol=1e-3)
    # Equal up to a test example near a tie (the smoke student is barely trained).
    np.testing.assert_allclose(three["student"]["per_seed"][seed]["test_accuracy"],
                               run["student"]["test_accuracy"], atol=2.5 / 359)
    exp1 = stages.setup(smoke(seed=seed, **{"teacher.checkpoint": teacher}),
                        str(tmp_path / f"seed{seed}"))
    one = final_model(tmp_path / f"seed{seed}" / "student", exp1, "student")
    # Eq. 2's sum makes stage-1 gradients large: the two compilations' rounding shows
    # in the weights after both stages (up to ~2e-3 on a 2-core x86-64 CPU). So each
    # array must be far closer to its one-seed run than another seed's is.
    same = jax.tree.map(lambda x: x[seed], weights3)
    other = jax.tree.map(lambda x: x[(seed + 1) % 3], weights3)
    compared = 0
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(same)[0],
                               jax.tree.leaves(one), jax.tree.leaves(other)):
      a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
      apart = np.max(np.abs(c - b))
      if apart > 1e-3:  # (arrays all seeds keep alike, e.g. never-updated statistics)
        assert np.max(np.abs(a - b)) <= 0.1 * apart, jax.tree_util.keystr(path)
        compared += 1
    assert compared >= 20  # ResNet-8: every kernel, BN scale and bias, the classifier.
    accs.append(run["student"]["test_accuracy"])
  # Means, spread and the per-seed list as the paper reports them.
  per_seed = [p["test_accuracy"] for p in three["student"]["per_seed"]]
  assert three["student"]["test_accuracy"] == pytest.approx(np.mean(per_seed))
  assert three["student"]["test_accuracy_std"] == pytest.approx(np.std(per_seed, ddof=1))
  # Each seed's accuracy and the ensemble's are what the final checkpoint scores.
  config3 = smoke(num_seeds=3, **{"teacher.checkpoint": teacher})
  recomputed, ensemble, one = checkpoint_accuracies(config3, three_dir, "student")
  np.testing.assert_allclose(per_seed, recomputed, atol=one + 1e-9)
  assert abs(three["student"]["ensemble_test_accuracy"] - ensemble) <= one + 1e-9


def test_ensemble_is_the_mean_softmax_of_the_seeds(teacher, three_seeds):
  workdir, results = three_seeds
  config = smoke(num_seeds=3, **{"teacher.checkpoint": teacher})
  exp = stages.setup(config, str(workdir))
  variables = final_model(workdir / "student", exp, "student", seeds=3)
  images, labels = exp.dataset.test_images, exp.dataset.test_labels
  probs = 0
  for k in range(3):
    logits = train.predict(exp.networks["student"], jax.tree.map(lambda x: x[k], variables),
                           images, exp.mesh, config.eval_batch_size)
    probs = probs + jax.nn.softmax(jnp.asarray(logits), -1)
  want = float(np.mean(np.argmax(np.asarray(probs), -1) == labels))
  got = results["student"]["ensemble_test_accuracy"]
  assert got == pytest.approx(want)


def test_device_batches_depend_only_on_seed_and_step():
  ds = data.load_digits(8)
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  idx = data.train_batch_indices(len(ds.train_labels), 32, 5, 7)
  augment = data.Augment(pad=1, flip=True)
  fn = jax.jit(lambda i, s, t: data.device_train_batch(images, labels, i, s, t,
                                                       augment))
  a, b = fn(idx, 5, 7), fn(idx, 5, 7)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], ds.train_labels[idx])
  assert not np.array_equal(fn(idx, 5, 8)["image"], a["image"])
  # Each image is a crop of its zero-padded source (the paper's augmentation).
  padded = np.pad(ds.train_images[idx], ((0, 0), (1, 1), (1, 1), (0, 0)))
  for k in range(4):
    crops = [padded[k, y:y + 8, x:x + 8] for y in range(3) for x in range(3)]
    crops += [c[:, ::-1] for c in crops]
    assert any(np.array_equal(np.asarray(a["image"][k]), c) for c in crops)


def test_device_pipeline_trains_and_resumes_exactly(tmp_path, monkeypatch):
  config = smoke(**{"data.pipeline": "device", "steps_per_call": 2})
  clean = train.run(config, str(tmp_path / "clean"))
  # Interrupted in stage 1 before its call of steps 6..7 (checkpoint at step 4), then
  # resumed from that checkpoint.
  real = data.train_calls

  def interrupted(*args, **kwargs):
    for lo, hi, inputs in real(*args, **kwargs):
      if stage[0] == "fsp" and lo == 6:
        raise KeyboardInterrupt
      yield lo, hi, inputs

  stage = [None]
  real_stage = train.train_and_evaluate

  def train_and_evaluate(s, *a):
    stage[0] = s.name
    return real_stage(s, *a)

  monkeypatch.setattr(data, "train_calls", interrupted)
  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(data, "train_calls", real)
  resumed = train.run(config, str(tmp_path / "resumed"))
  for name in ("teacher", "fsp", "student"):
    assert losses(tmp_path / "resumed" / name) == losses(tmp_path / "clean" / name)
    for key in ("test_accuracy", "test_fsp_loss"):
      if key in clean[name]:
        assert resumed[name][key] == clean[name][key]


def test_several_seeds_resume_after_sigkill_equals_uninterrupted(tmp_path, cli_env):
  cli_env = quick_compile(cli_env)  # The three runs compile the same programs.

  def cli(workdir, fault=""):
    entry = [FAULTS] if fault else ["-m", "fsp_jax.main"]
    return subprocess.run(
        [sys.executable, *entry, "--config", "quickstart:smoke", "--workdir",
         str(workdir), "--config.baselines=()", "--config.num_seeds=2",
         "--config.steps_per_call=2", "--config.log_every=2"],
        cwd=REPO, env=dict(cli_env, FSP_FAULT=fault), capture_output=True, text=True,
        timeout=900)
  clean = cli(tmp_path / "clean")
  assert clean.returncode == 0, clean.stderr
  killed = cli(tmp_path / "run", fault="mid_save:student:8")
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  resumed = cli(tmp_path / "run")
  assert resumed.returncode == 0, resumed.stderr
  assert "[student] resumes from its checkpoint at step 4" in resumed.stderr
  got = json.load(open(tmp_path / "run" / "results.json"))
  want = json.load(open(tmp_path / "clean" / "results.json"))
  for name in ("teacher", "fsp", "student"):
    for key in ("test_accuracy", "test_fsp_loss", "ensemble_test_accuracy"):
      assert got[name].get(key) == want[name].get(key), (name, key)
    assert got[name].get("per_seed") == want[name].get("per_seed")
    assert losses(tmp_path / "run" / name) == losses(tmp_path / "clean" / name)


def test_sharded_training_set_gives_the_replicated_batches():
  """The device pipeline's training set is sharded over the mesh by examples (each
  device a quarter of it here); its batches equal gathering from a replicated copy."""
  ds = data.load_digits(8)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  images, labels = data.device_train_data(ds, mesh)
  n_dev = len(jax.devices())
  assert images.shape[0] % n_dev == 0 and images.shape[0] - len(ds.train_labels) < n_dev
  assert {s.data.shape[0] for s in images.addressable_shards} == {
      images.shape[0] // n_dev}
  idx = data.train_batch_indices(len(ds.train_labels), 32, 5, 7)
  idx = jax.device_put(idx.astype(np.int32), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  augment = data.Augment(pad=1, flip=True)
  sharded = jax.jit(lambda im, lb, i: data.device_train_batch(
      im, lb, i, 5, 7, augment, mesh=mesh))(images, labels, idx)
  replicated = jax.jit(lambda im, lb, i: data.device_train_batch(
      im, lb, i, 5, 7, augment))(jnp.asarray(ds.train_images),
                                 jnp.asarray(ds.train_labels), idx)
  np.testing.assert_array_equal(sharded["image"], replicated["image"])
  np.testing.assert_array_equal(sharded["label"], ds.train_labels[np.asarray(idx)])
  assert sharded["image"].sharding.spec[0] == "data"
