"""Teacher FSP caching (config.fsp.cache_teacher): the same stage 1 as recomputing."""
import functools
import json

import jax
import numpy as np
import pytest

from conftest import shared_dir
from fsp_jax import data, fsp, methods, models, stages, train
from fsp_jax.configs import default



def test_cached_teacher_matrices_give_the_recomputed_steps():
  ds = data.load_digits(16)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  stats = tuple(map(float, ds.mean)), tuple(map(float, ds.std))
  teacher = models.Network(models.create_model("cifar_resnet14", 10), *stats)
  student = models.Network(models.create_model("cifar_resnet8", 10), *stats)
  teacher_vars = teacher.init(jax.random.PRNGKey(1), (16, 16, 1))
  distiller = methods.FSP(fsp.default_fsp_pairs(student.feature_names))
  teacher_fsp = jax.jit(lambda images: train.teacher_targets(
      teacher, teacher_vars, images, distiller))
  # Batches of 40 over 4 devices: a different batch composition than training uses.
  cache = data.map_examples(teacher_fsp, ds.train_images, mesh, 40)
  n = len(ds.train_labels)
  assert [c.shape for c in cache] == [(n, 16, 16), (n, 16, 32), (n, 32, 64)]
  tx = train.create_optimizer(train.create_learning_rate_fn((1e-3,), ()), 0.9, 1e-4)
  step = jax.jit(functools.partial(train.train_step, student=student, teacher=teacher,
                                   distiller=distiller, use_labels=False))
  runs = []
  for extras in (None, {"teacher_targets": cache}):
    variables = student.init(jax.random.PRNGKey(0), (16, 16, 1))
    state = train.create_train_state(student, variables, tx)
    losses = []
    for _, batch in data.train_batches(ds, mesh, 32, seed=0, start_step=0, num_steps=3,
                                       augment=data.Augment.none(), extras=extras):
      assert ("teacher_targets" in batch) == (extras is not None)
      # With the cache, no teacher at all: only the cached matrices.
      state, metrics = step(state, batch, None if extras else teacher_vars)
      losses.append(float(metrics["loss"]))
    runs.append((losses, jax.device_get(state.params)))
  (l_recomputed, p_recomputed), (l_cached, p_cached) = runs
  assert l_recomputed[0] > 0
  # The first step's loss, from the same weights, differs only by the matrices'
  # rounding; later steps amplify it (2e-5 by step 3). Matrices paired with the wrong
  # examples would change the losses by O(1).
  np.testing.assert_allclose(l_cached[0], l_recomputed[0], rtol=1e-5)
  np.testing.assert_allclose(l_cached, l_recomputed, rtol=2e-4)
  # The cached matrices come from batches of 40, the recomputed ones of 32: float32
  # rounding differs, and Eq. 2's sum at initialisation (losses ~1e3) makes the first
  # steps large and sensitive to it. So the updates must agree to 2 % of their size,
  # over all weights and in each array whose update is not float noise (an input BN
  # scale moves by 1e-5); an example's matrices paired with another example's would
  # change them by O(1).
  initial = jax.device_get(train.create_train_state(
      student, student.init(jax.random.PRNGKey(0), (16, 16, 1)), tx).params)
  cached = jax.tree_util.tree_flatten_with_path(p_cached)[0]
  leaves = [(jax.tree_util.keystr(path), np.asarray(a), np.asarray(b), np.asarray(w))
            for (path, a), b, w in zip(cached, jax.tree.leaves(p_recomputed),
                                       jax.tree.leaves(initial))]
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for _, a, b, _ in leaves))
  total = np.sqrt(sum(np.sum((b - w) ** 2) for _, _, b, w in leaves))
  assert total > 0 and diff <= 0.02 * total
  largest = max(np.abs(b - w).max() for _, _, b, w in leaves)
  for name, a, b, w in leaves:
    update = np.abs(b - w).max()
    if update > 0.01 * largest:
      assert np.all(np.abs(a - b) <= 0.02 * update + 1e-6), name


def tiny_config(augment=True):
  config = default.get_config()
  config.data.source = "digits"
  config.data.image_size = (8, 8)
  config.data.pad = 1
  config.teacher.model = config.student.model = "cifar_resnet8"
  config.teacher.schedule = default.schedule(6, (0.1,), (), batch_size=32,
                                                augment=augment)
  config.fsp.schedule = default.schedule(8, (1e-3,), (), batch_size=32,
                                            augment=augment)
  config.student.schedule = default.schedule(1, (0.1,), (), batch_size=32)
  config.baselines = ()
  config.eval_batch_size = 120
  config.eval_every = 0
  config.log_every = 2
  return config


def _losses(stage_dir):
  with open(stage_dir / "metrics.jsonl") as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A trained teacher stage directory of `tiny_config`, shared by the tests here."""
  config = tiny_config(augment=False)
  config.teacher_only = True
  workdir = shared_dir(tmp_path_factory, "fsp_cache_teacher",
                       lambda d: train.run(config, str(d)))
  return str(workdir / "teacher")


def test_pipeline_cache_teacher_matches_recomputing(tmp_path, tiny_teacher):
  config = tiny_config(augment=False)
  config.teacher.checkpoint = tiny_teacher
  recomputed = train.run(config, str(tmp_path / "a"))
  config.fsp.cache_teacher = True
  cached = train.run(config, str(tmp_path / "b"))
  np.testing.assert_allclose(cached["fsp"]["test_fsp_loss"],
                             recomputed["fsp"]["test_fsp_loss"], rtol=1e-5)
  a, b = _losses(tmp_path / "a" / "fsp"), _losses(tmp_path / "b" / "fsp")
  assert len(a) == 4 and a[0] > 0
  np.testing.assert_allclose(b, a, rtol=1e-5)
  np.testing.assert_allclose(cached["student"]["test_accuracy"],
                             recomputed["student"]["test_accuracy"], atol=1e-6)


# Every training loop the cache passes through: several steps per jitted call, seeds
# side by side each with its own stage 1 (the cache gathered per seed's batch), and
# the training set on the device (the cache gathered on the host beside the indices).
LOOPS = {
    "steps_per_call": dict(steps_per_call=4),
    "seeds_not_shared": dict(num_seeds=2),
    "device_pipeline": dict(pipeline="device"),
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cache_teacher_in_every_loop_matches_recomputing(loop, tmp_path, tiny_teacher):
  settings = LOOPS[loop]
  results = {}
  for cached in (False, True):
    config = tiny_config(augment=False)
    config.teacher.checkpoint = tiny_teacher
    config.steps_per_call = settings.get("steps_per_call", 1)
    config.num_seeds = settings.get("num_seeds", 1)
    config.fsp.shared = False
    config.data.pipeline = settings.get("pipeline", "host")
    config.fsp.cache_teacher = cached
    workdir = tmp_path / ("cached" if cached else "recomputed")
    results[cached] = (train.run(config, str(workdir)), _losses(workdir / "fsp"))
  (ref, ref_losses), (got, got_losses) = results[False], results[True]
  assert len(ref_losses) == 4 and ref_losses[0] > 0
  np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(got["fsp"]["test_fsp_loss"], ref["fsp"]["test_fsp_loss"],
                             rtol=1e-5)
  if "num_seeds" in settings:  # Each seed trained its own stage 1.
    assert len(got["fsp"]["per_seed"]) == 2
  np.testing.assert_allclose(got["student"]["test_accuracy"],
                             ref["student"]["test_accuracy"], atol=1e-6)


def test_cache_teacher_with_augmentation_is_a_clear_error():
  config = tiny_config()
  config.fsp.cache_teacher = True
  config.fsp.schedule.augment = True
  with pytest.raises(ValueError, match="fsp.schedule.augment=False"):
    stages.plan_stages(config)  # Before any training.
  config.fsp.schedule.augment = False
  assert [s.name for s in stages.plan_stages(config)] == ["teacher", "fsp", "student"]
