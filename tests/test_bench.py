"""benchmarks/bench.py runs and reports what it promises (no speed assertions here:
timings on a shared machine belong in benchmarks, not in tests)."""
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ is a folder of the checkout, not of the package.

from benchmarks import bench  # noqa: E402
from conftest import with_devices  # noqa: E402
from fsp_jax import methods, train  # noqa: E402

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


def test_bench_steps_are_the_training_loops_jitted_steps():
  steps = bench.Steps(bench.parse_args(TINY + ["--teacher_depth", "14"]))
  # train.jit_train_step's: jax.jit of train.train_step with the stage's arguments.
  step_args = {}
  for name in ("main", "fsp", "teacher", "fsp_cached"):
    wrapped = steps.fns[name][0].__wrapped__
    assert wrapped.func is train.train_step, name
    step_args[name] = wrapped.keywords
  main, fsp, teacher = step_args["main"], step_args["fsp"], step_args["teacher"]
  assert main["teacher"] is main["distiller"] is None and main["use_labels"]
  assert teacher["student"].module.modules_per_section == (2, 2, 2)  # ResNet-14.
  assert main["student"].module.modules_per_section == (1, 1, 1)  # ResNet-8.
  assert isinstance(fsp["distiller"], methods.FSP) and not fsp["use_labels"]
  assert fsp["student"] == main["student"] and fsp["teacher"] == teacher["student"]
  # The cached stage 1 is the same compiled step, fed the teacher's matrices.
  assert steps.fns["fsp_cached"][0] is steps.fns["fsp"][0]
  assert "teacher_targets" in steps.fns["fsp_cached"][2][0]
  fn, state, _ = steps.fns["main"]
  steps.run_once("main")
  assert state.step.is_deleted()  # Donated, as the training loop's step donates it.
  assert int(steps.states["main"].step) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_compare_alternates_with_the_torch_peer():
  out = bench.compare(bench.parse_args(TINY + ["--repeats", "1",
                                               "--torch_settings", "nchw"]))
  for step in bench.STEPS:
    assert out["ratio_jax_over_best_torch"][step]["median"] > 0


def test_bench_script_runs_from_anywhere(tmp_path):
  """`python benchmarks/bench.py ...` as the docs run it, from another directory: it
  reads fsp_jax from the installed package, not from the working directory."""
  import json
  import subprocess
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), *TINY,
       "--only", "main"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=with_devices(dict(os.environ, JAX_PLATFORMS="cpu"), 1))
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["main_images_per_s"] > 0 and result["devices"] == 1


def _benchmark_script(name):
  path = os.path.join(os.path.dirname(bench.TORCH_REFERENCE), f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_winograd_probe_computes_the_same_convolution_and_gradients():
  """The README reports the Winograd probe's speed; its values must be the layer's."""
  import jax
  import numpy as np
  probe = _benchmark_script("winograd_probe")
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 8, 6, 5))
  w = jax.random.normal(kw, (3, 3, 5, 7))
  g = jax.random.normal(kg, (2, 8, 6, 7))
  ref = (probe._lax(x, w), *jax.vjp(probe._lax, x, w)[1](g))
  new = (probe.winograd_conv(x, w), *jax.vjp(probe.winograd_conv, x, w)[1](g))
  for a, b in zip(ref, new):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)


def test_conv_probe_lists_every_convolution_of_the_resnets():
  probe = _benchmark_script("conv_probe") if importlib.util.find_spec("torch") else None
  if probe is None:
    pytest.skip("benchmarks/conv_probe.py needs torch")
  for depth in (8, 26):
    convs = probe.resnet_convs(depth, 128)
    # Stem + two per residual module + two projection shortcuts.
    assert sum(convs.values()) == 1 + 2 * 3 * (depth - 2) // 6 + 2
