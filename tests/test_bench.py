"""fsp_jax.bench runs and reports what it promises (no speed assertions here: timings
on a shared machine belong in benchmarks, not in tests)."""
import importlib.util

import pytest

from fsp_jax import bench

TINY = ["--teacher_depth", "8", "--student_depth", "8", "--batch_size", "8",
        "--steps", "1", "--warmup", "1"]


def test_bench_reports_the_torch_peer_keys_and_more():
  out = bench.run_jax(bench.parse_args(TINY))
  for key in ("main_images_per_s", "fsp_images_per_s", "teacher_images_per_s",
              "fsp_over_main", "teacher_forward_images_per_s", "fsp_cached_images_per_s",
              "fsp_over_teacher_forward_plus_main", "fsp_cached_over_main"):
    assert out[key] > 0, key
  for step in ("main", "fsp", "teacher", "teacher_forward", "fsp_cached"):
    assert out["memory"][step]["peak_mb"] > 0


def test_bench_steps_are_the_pipelines_jitted_steps():
  steps = bench.Steps(bench.parse_args(TINY))
  for name in ("main", "fsp", "teacher", "fsp_cached"):  # Pipeline.make_train_step's.
    assert steps.fns[name][0].__wrapped__.__qualname__ == "jit_train_step.<locals>.step"
  fn, state, _ = steps.fns["main"]
  steps.run_once("main")
  assert state.step.is_deleted()  # Donated, as the pipeline's step donates it.
  assert int(steps.states["main"].step) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_compare_alternates_with_the_torch_peer():
  out = bench.compare(bench.parse_args(TINY + ["--repeats", "1",
                                               "--torch_settings", "nchw"]))
  for step in bench.STEPS:
    assert out["ratio_jax_over_best_torch"][step]["median"] > 0
