"""Models of your own through the whole pipeline: import paths on the command line
(Linen student: FSP, FitNet and KD; resume; fingerprints), an NNX student in process,
one-line errors with exit status 2, and the README's "Distil your own model" code."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, checkpoint_accuracies, quick_compile

if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from examples import cnn_nnx  # noqa: E402

SMALL_CNN = ("--config.student.model=examples.cnn_linen:SmallCNN",
             "--config.student.features=('stem','block1','block2','block3')")


VIT = ["--config.student.model=examples.vit_student:ViT",
       "--config.student.features=('patch_embed','block1','block2','block3')",
       "--config.data.image_size=(16,16)"]


def gray_nnx_cnn(num_classes, *, rngs):
  """The NNX SmallCNN for the bundled digits (one channel); an NNX factory."""
  return cnn_nnx.SmallCNN(num_classes, in_features=1, rngs=rngs)


def _cli(args, env, workdir):
  env = dict(env, PYTHONPATH=os.pathsep.join(
      [REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")]))
  return subprocess.run(
      [sys.executable, "-m", "fsp_jax.main", "--config", "quickstart:smoke",
       "--workdir", str(workdir), *args], env=env, cwd=str(workdir.parent),
      capture_output=True, text=True, timeout=600)


def test_cli_import_path_student_fsp_fitnet_kd_and_resume(tmp_path, cli_env):
  cli_env = quick_compile(cli_env)  # It compares no two programs' numbers.
  workdir = tmp_path / "run"
  args = [*SMALL_CNN, "--config.methods=('fsp','fitnet','kd')",
          "--config.baselines=()", "--config.fitnet.hint_feature=block2",
          "--config.fitnet.guided_feature=block2"]
  proc = _cli(args, cli_env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert {"teacher", "fsp", "student", "fitnet_hint", "fitnet", "kd"} <= set(results)
  assert results["student"]["model"] == "examples.cnn_linen:SmallCNN"
  fingerprint = json.loads((workdir / "fsp" / "stage.json").read_text())["fingerprint"]
  assert fingerprint["model"] == "examples.cnn_linen:SmallCNN"
  assert fingerprint["features"] == ["stem", "block1", "block2", "block3"]
  # Done: a second run resumes (skips) every stage.
  again = _cli(args, cli_env, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "finished earlier" in again.stderr
  # Other features are another experiment: refused, in one line.
  os.remove(workdir / "results.json")
  other = [a.replace("'block3'", "'block3/conv_bn1'") for a in args]
  refused = _cli(other, cli_env, workdir)
  assert refused.returncode == 2
  line = refused.stderr.strip().splitlines()[-1]
  assert line.startswith("fsp_jax: error:") and "features" in line, refused.stderr


@pytest.mark.parametrize("args, expect", [
    (["--config.student.model=examples.no_such:Net", SMALL_CNN[1]],
     "cannot import module 'examples.no_such'"),
    ([SMALL_CNN[0], "--config.student.features=('stem','blok1','block2','block3')"],
     "closest layer paths: 'block1'"),
    # Unpairable maps: a class token left in (17 tokens are no grid).
    (VIT, "is not a square grid"),
])
def test_cli_bad_model_input_is_one_line_exit_2(args, expect, tmp_path, cli_env):
  proc = _cli(args, cli_env, tmp_path / "run")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fsp_jax: error:"), proc.stderr
  assert expect in lines[0], lines[0]
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("student, expect", [
    (dict(model="examples.cnn_linen:SmallCNN", features=("stem", "block1", "block2")),
     "differ in number"),
    (dict(model="examples.cnn_linen:SmallCNN"), "names no features"),
    # Token maps as grids, but widths differ and there are no adapters.
    (dict(model="examples.vit_student:ViT", drop_tokens=1,
          features=("patch_embed", "block1", "block2", "block3")),
     "set fsp.adapter=True"),
    (dict(model="examples.vit_student:ViT", drop_tokens=1, token_grid=(2, 4),
          features=("patch_embed", "block1", "block2", "block3")), "holds 8 tokens"),
])
def test_setup_refuses_unpairable_models_in_one_line(student, expect, tmp_path):
  from fsp_jax import stages
  config = _smoke_config(**student)
  config.data.image_size = (16, 16)
  with pytest.raises(ValueError) as e:
    stages.setup(config, str(tmp_path))
  assert "\n" not in str(e.value) and expect in str(e.value), str(e.value)


def _smoke_config(**student):
  from fsp_jax import config_lib
  config = config_lib.load("quickstart:smoke")
  config.baselines = ()
  for key, value in student.items():
    config.student[key] = value
  return config


def test_nnx_student_in_the_pipeline_steps_and_checkpoints(tmp_path):
  """An NNX model by import path through the pipeline's own pieces: setup, the jitted
  FSP step with adapters on the sharded batch (4 devices, tests/conftest.py), and an
  Orbax checkpoint of its state restored as a stage restores it."""
  import jax
  from fsp_jax import checkpoints, data, stages, train
  config = _smoke_config(model="test_examples:gray_nnx_cnn",
                         features=("stem", "block1", "block2", "block3"))
  config.teacher.width_multiplier = 2  # 32/64/128 channels against 16/32/64.
  config.fsp.adapter = True
  exp = stages.setup(config, str(tmp_path))
  student, teacher = exp.networks["student"], exp.networks["teacher"]
  assert isinstance(student.module, stages.models.NnxModel)
  assert teacher.feature_names == ("stem", "block1", "block2", "block3")
  stage = next(s for s in exp.stages if s.kind == "fsp")
  distiller = exp.objective(stage)
  state = train.create_train_state(
      student, stages.random_variables(exp, "student"), train.create_optimizer(
          lambda _: 0.05, 0.9, 1e-4), stages.initial_distiller_params(exp, stage,
                                                                      distiller))
  assert set(state.distiller_params) == {f"adapter_{k}" for k in student.feature_names}
  step = train.jit_train_step(student, teacher, distiller, False)
  t_vars = stages.random_variables(exp, "teacher")
  batches = data.train_batches(exp.dataset, exp.mesh, 32, 0, 0, 2)
  losses = []
  for _, batch in batches:
    state, metrics = step(state, batch, t_vars)
    losses.append(float(metrics["loss"]))
  assert all(l > 0 for l in losses)
  mngr = checkpoints.manager(str(tmp_path / "stage"))
  checkpoints.save(mngr, 2, state)
  mngr.wait_until_finished()
  restored, _ = checkpoints.restore_state(mngr, 2, state)
  mngr.close()
  for a, b in zip(jax.tree.leaves(restored.variables), jax.tree.leaves(state.variables)):
    assert (a == b).all()


@pytest.mark.slow
def test_nnx_student_trains_and_resumes_in_process(tmp_path):
  """An NNX model given by import path: FSP with adapters (widths differ), stage 2,
  checkpoints read back; 4 devices (tests/conftest.py), so the batch is sharded."""
  from fsp_jax import stages, train
  config = _smoke_config(model="test_examples:gray_nnx_cnn",
                         features=("stem", "block1", "block2", "block3"))
  config.teacher.width_multiplier = 2  # 32/64/128 channels against 16/32/64.
  config.fsp.adapter = True
  results = train.run(config, str(tmp_path))
  assert results["student"]["model"] == "test_examples:gray_nnx_cnn"
  assert results["teacher"]["test_accuracy"] > 0.2  # Chance: 10 %; measured 35.1 %.
  (recomputed,), _, one = checkpoint_accuracies(config, tmp_path, "student")
  assert abs(results["student"]["test_accuracy"] - recomputed) <= one + 1e-9
  assert results["fsp"]["test_fsp_loss"] > 0
  exp = stages.setup(config, str(tmp_path))
  assert isinstance(exp.networks["student"].module, stages.models.NnxModel)
  assert exp.networks["teacher"].feature_names == ("stem", "block1", "block2", "block3")
  variables = stages.initial_variables(exp, exp.stages[-1])  # Stage 1's final weights.
  assert set(variables) == {"params", "batch_stats"}
  # Stage 1's final weights merge back into the NNX module and are its state again.
  model = nnx.merge(exp.networks["student"].module.graphdef,
                    nnx.State(variables["params"]), nnx.State(variables["batch_stats"]))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, params, variables["params"])


@pytest.mark.slow
def test_vit_student_with_token_maps_in_process(tmp_path):
  from fsp_jax import train
  config = _smoke_config(model="examples.vit_student:ViT", drop_tokens=1,
                         features=("patch_embed", "block1", "block2", "block3"))
  config.data.image_size = (16, 16)
  config.fsp.adapter = True
  # As examples/vit_student.py: the element-mean loss, at a low learning rate.
  config.fsp.reduction = "mean"
  config.fsp.schedule.learning_rates = (0.002,)
  results = train.run(config, str(tmp_path))
  assert results["fsp"]["test_fsp_loss"] > 0
  (recomputed,), _, one = checkpoint_accuracies(config, tmp_path, "student")
  assert abs(results["student"]["test_accuracy"] - recomputed) <= one + 1e-9


def test_readme_own_model_section_runs_as_written():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text[text.index("## Distil your own model"):]
  section = section[:section.index("\n## ", 1)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1, "the section has one Python block"
  exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.slow
def test_own_models_doc_code_runs():
  text = open(os.path.join(REPO, "docs", "own_models.md")).read()
  namespace = {"__name__": "doc"}  # The blocks read as one session.
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2, "docs/own_models.md shows its Linen and NNX examples"
  for block in blocks:
    exec(compile(block, "docs/own_models.md", "exec"), namespace)
