"""End to end: a tiny pipeline, stage hand-over, resume, and CLI errors."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fsp_jax import checkpoints, config_lib, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """configs/tiny.py: digits at 8x8, ResNet-8 teacher and student, a few steps."""
  spec = importlib.util.spec_from_file_location(
      "tiny_config", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _final_model(stage_dir, template):
  return checkpoints.restore_model(stage_dir, template)[0]


def test_tiny_pipeline_end_to_end(tmp_path):
  config = tiny_config()
  results = pipeline.run(config, str(tmp_path))
  assert list(results) == ["teacher", "fsp", "student", "scratch"]
  for name in ("teacher", "student", "scratch"):
    assert 0.0 <= results[name]["test_accuracy"] <= 1.0
    assert results[name]["wall_time_s"] > 0
  assert results["fsp"]["test_fsp_loss"] > 0
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk["student"]["steps"] == 8
  lines = [json.loads(l) for l in open(tmp_path / "fsp" / "metrics.jsonl")]
  assert [l["step"] for l in lines if "loss" in l] == [4, 8]
  assert any("test_fsp_loss" in l for l in lines)
  table = pipeline.results_table(results)
  assert "FSP student" in table and "student from scratch" in table
  # Re-running skips finished stages.
  again = pipeline.run(config, str(tmp_path))
  assert again == results


def test_stage_two_starts_from_stage_one_final_weights(tmp_path):
  config = tiny_config()
  config.baselines = ()
  # A zero learning rate and no weight decay: stage 2's parameters never move, so its
  # final parameters are its initial ones.
  config.student.schedule = config_lib.schedule(4, (0.0,), (), batch_size=32,
                                                weight_decay=0.0)
  p = pipeline.Pipeline(config, str(tmp_path))
  p.run()
  template = p.init_variables("student")
  fsp_final = _final_model(str(tmp_path / "fsp"), template)
  student_final = _final_model(str(tmp_path / "student"), template)
  jax.tree.map(np.testing.assert_array_equal, fsp_final["params"], student_final["params"])
  scratch = p.init_variables("student")
  assert not np.array_equal(fsp_final["params"]["stem_conv"]["kernel"],
                            scratch["params"]["stem_conv"]["kernel"])


class _Interrupt(Exception):
  pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
  config = tiny_config()
  config.baselines = ()
  pipeline.run(config, str(tmp_path / "clean"))

  # Interrupt stage 1 after its 6th step (last checkpoint at step 4).
  real = pipeline.data.train_batches

  def interrupted(*args, **kwargs):
    for step, batch in real(*args, **kwargs):
      if step == 6 and _stage[0] == "fsp":
        raise _Interrupt()
      yield step, batch

  _stage = [None]
  real_run_stage = pipeline.Pipeline.run_stage

  def run_stage(self, stage):
    _stage[0] = stage.name
    return real_run_stage(self, stage)

  monkeypatch.setattr(pipeline.data, "train_batches", interrupted)
  monkeypatch.setattr(pipeline.Pipeline, "run_stage", run_stage)
  with pytest.raises(_Interrupt):
    pipeline.run(config, str(tmp_path / "resumed"))
  assert json.load(open(tmp_path / "resumed" / "results.json")).keys() == {"teacher"}
  monkeypatch.setattr(pipeline.data, "train_batches", real)
  resumed = pipeline.run(config, str(tmp_path / "resumed"))

  clean = json.load(open(tmp_path / "clean" / "results.json"))
  for name in ("teacher", "fsp", "student"):
    for key in ("test_accuracy", "test_fsp_loss"):
      if key in clean[name]:
        np.testing.assert_allclose(resumed[name][key], clean[name][key], rtol=1e-5)
  p = pipeline.Pipeline(config, str(tmp_path / "clean"))
  template = p.init_variables("student")
  a = _final_model(str(tmp_path / "clean" / "student"), template)
  b = _final_model(str(tmp_path / "resumed" / "student"), template)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def _cli(env, *args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "fsp_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc, message):
  assert proc.returncode == 2, proc.stderr
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("fsp_jax: error")]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--config.no_such_field=1"], "unknown config field 'no_such_field'"),
    (["--config.data.sorce=digits"], "unknown config field 'sorce'"),
    (["--config=configs/no_such_config.py"], "cannot load the --config file"),
    (["--config.data.source=tfds", "--config.data.name=no_such_dataset_xyz"],
     "unknown tensorflow-datasets data set"),
    (["--config.data.source=imagenet_csv"], "unknown data source 'imagenet_csv'"),
    (["--config.data.source=folder", "--config.data.root=FOLDER"],
     "is not a readable image"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"], "teacher checkpoint"),
    (["--config.teacher.width_multiplier=2"], "cannot be paired for FSP"),
    (["--config.fsp.fsp_pairs=((0,9),)"], "FSP pair (0, 9) is out of range"),
    (["--config.teacher.model=cifar_resnet27"], "unknown model"),
    (["--num_processes=2"], "go together"),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, cli_env, args, message):
  if any("FOLDER" in a for a in args):
    from test_data import _write_folder
    root = _write_folder(tmp_path / "images")
    with open(os.path.join(root, "test", "dog", "broken.jpg"), "w") as f:
      f.write("not a jpeg")
    args = [a.replace("FOLDER", root) for a in args]
  workdir = tmp_path / "w"
  proc = _cli(cli_env, "--config", os.path.join(REPO, "configs", "tiny.py"),
              "--workdir", str(workdir), *args)
  _assert_one_line_error(proc, message)
  assert not os.path.exists(workdir / "teacher")  # Refused before anything was written.


def test_cli_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cli_env):
  # The learning rate explodes after step 8: the loss is NaN at step 11, between the
  # log steps (every 4), and is still reported at its exact step.
  workdir = tmp_path / "w"
  proc = _cli(cli_env, "--config", os.path.join(REPO, "configs", "tiny.py"),
              "--workdir", str(workdir), "--config.teacher_only=True",
              "--config.teacher.schedule.learning_rates=(0.1,1e30)")
  _assert_one_line_error(proc, "[teacher] the loss became nan at step 11; training "
                         "stopped and the last good checkpoint (step 8) is kept")
  assert "--config.teacher.schedule.learning_rates" in proc.stderr
  stage_dir = workdir / "teacher"
  assert sorted(os.listdir(stage_dir / checkpoints.CHECKPOINT_DIR)) == ["4", "8"]
  p = pipeline.Pipeline(tiny_config(), str(tmp_path / "other"))
  template = p.abstract_variables("teacher")
  variables, step = checkpoints.restore_model(str(stage_dir), template)
  assert step == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert not os.path.exists(workdir / pipeline.RESULTS)
