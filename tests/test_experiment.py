"""End to end: a smoke-size experiment, stage hand-over, resume, and CLI errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import checkpoint_accuracies
from fsp_jax import checkpoints, config_lib, data, metrics, models, stages, train
from fsp_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """quickstart:smoke: digits at 8x8, ResNet-8 teacher and student, a few steps."""
  return config_lib.load("quickstart:smoke")


def _final_model(stage_dir, template):
  return checkpoints.restore_model(stage_dir, template)[0]


def test_smoke_experiment_end_to_end(tmp_path):
  config = tiny_config()
  results = train.run(config, str(tmp_path))
  assert list(results) == ["teacher", "fsp", "student", "scratch"]
  for name in ("teacher", "student", "scratch"):
    # What the run reports is what its final checkpoint scores on the test set.
    (recomputed,), _, one = checkpoint_accuracies(config, tmp_path, name)
    assert abs(results[name]["test_accuracy"] - recomputed) <= one + 1e-9, name
    assert results[name]["wall_time_s"] > 0
  # 12 and 8 steps of a ResNet-8 learn digits well above chance (10 %): measured
  # 27.6 % and 32.0 % on 4 devices; an untrained or mis-restored network stays near 10 %.
  assert results["teacher"]["test_accuracy"] > 0.2
  assert results["scratch"]["test_accuracy"] > 0.2
  assert results["fsp"]["test_fsp_loss"] > 0
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk["student"]["steps"] == 8
  lines = [json.loads(l) for l in open(tmp_path / "fsp" / "metrics.jsonl")]
  assert [l["step"] for l in lines if "loss" in l] == [4, 8]
  assert any("test_fsp_loss" in l for l in lines)
  table = metrics.results_table(results)
  assert "FSP student" in table and "student from scratch" in table
  # Re-running skips finished stages.
  again = train.run(config, str(tmp_path))
  assert again == results


def test_evaluations_during_a_stage_can_take_a_fixed_test_subset(tmp_path):
  config = tiny_config()
  config.teacher_only = True
  config.eval_examples = 60
  results = train.run(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "teacher" / "metrics.jsonl")]
  evals = [r for r in rows if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [4, 8, 12]
  assert [r.get("test_examples") for r in evals] == [60, 60, None]  # Final: all.
  assert evals[-1]["test_accuracy"] == results["teacher"]["test_accuracy"]
  # The same random subset every time, not the first examples (class-ordered sets).
  dataset = data.load_dataset(config.data)
  images, labels = data.test_split(dataset, 60)
  again, _ = data.test_split(dataset, 60)
  np.testing.assert_array_equal(images, again)
  assert len(set(labels.tolist())) >= 8
  assert not np.array_equal(images, dataset.test_images[:60])
  assert data.test_split(dataset, 0)[1] is dataset.test_labels


def test_stage_two_starts_from_stage_one_final_weights(tmp_path):
  config = tiny_config()
  config.baselines = ()
  # A zero learning rate and no weight decay: stage 2's parameters never move, so its
  # final parameters are its initial ones.
  config.student.schedule = default.schedule(4, (0.0,), (), batch_size=32,
                                             weight_decay=0.0)
  train.run(config, str(tmp_path))
  exp = stages.setup(config, str(tmp_path))
  template = stages.random_variables(exp, "student")
  fsp_final = _final_model(str(tmp_path / "fsp"), template)
  student_final = _final_model(str(tmp_path / "student"), template)
  jax.tree.map(np.testing.assert_array_equal, fsp_final["params"], student_final["params"])
  scratch = stages.random_variables(exp, "student")
  assert not np.array_equal(fsp_final["params"]["stem_conv"]["kernel"],
                            scratch["params"]["stem_conv"]["kernel"])


def test_pretrained_weights_fine_tune_with_a_new_classifier(tmp_path):
  ten = models.create_model("cifar_resnet8", 10)
  pre = models.init_variables(ten, jax.random.PRNGKey(5), (8, 8, 1))
  checkpoints.save_model(str(tmp_path / "pre"), pre)
  five = models.create_model("cifar_resnet8", 5)
  init = models.init_variables(five, jax.random.PRNGKey(0), (8, 8, 1))
  out, step = checkpoints.restore_pretrained(str(tmp_path / "pre"), init)
  assert step == 0
  np.testing.assert_array_equal(out["params"]["stem_conv"]["kernel"],
                                pre["params"]["stem_conv"]["kernel"])
  np.testing.assert_array_equal(out["batch_stats"]["stem_bn"]["var"],
                                pre["batch_stats"]["stem_bn"]["var"])
  np.testing.assert_array_equal(out["params"]["classifier"]["kernel"],
                                init["params"]["classifier"]["kernel"])
  other = models.init_variables(models.create_model("cifar_resnet14", 5),
                                jax.random.PRNGKey(0), (8, 8, 1))
  with pytest.raises(ValueError, match="another architecture"):
    checkpoints.restore_pretrained(str(tmp_path / "pre"), other)


def test_fitnet_and_adapted_fsp_stages_hand_over_the_student_alone(tmp_path):
  config = tiny_config()
  config.teacher.width_multiplier = 2  # Wider teacher: FSP needs the adapters.
  # The teacher fine-tunes pretrained weights of another task (3 classes); with a zero
  # learning rate, its final weights are those weights and a new 10-way classifier.
  teacher = models.create_model("cifar_resnet8", 3, width_multiplier=2)
  pretrained = models.init_variables(teacher, jax.random.PRNGKey(7), (8, 8, 1))
  checkpoints.save_model(str(tmp_path / "pretrained"), pretrained)
  config.teacher.pretrained = str(tmp_path / "pretrained")
  config.teacher.schedule = default.schedule(2, (0.0,), (), batch_size=32,
                                             weight_decay=0.0)
  config.fsp.adapter = True
  config.methods = ("fsp", "fitnet")
  config.baselines = ()
  config.fsp.schedule = default.schedule(4, (1e-3,), (), batch_size=32)
  config.fitnet.schedule = default.schedule(4, (1e-3,), (), batch_size=32)
  # Stage 2 with a zero learning rate: its final weights are its initial ones.
  config.student.schedule = default.schedule(2, (0.0,), (), batch_size=32,
                                             weight_decay=0.0)
  config.eval_every = 0
  results = train.run(config, str(tmp_path))
  exp = stages.setup(config, str(tmp_path))
  assert list(results) == ["teacher", "fsp", "student", "fitnet_hint", "fitnet"]
  assert results["fsp"]["test_fsp_loss"] > 0 and results["fitnet_hint"]["test_hint_loss"] > 0
  lines = [json.loads(l) for l in open(tmp_path / "fitnet" / "metrics.jsonl")]
  assert all(np.isfinite(l["kd_loss"]) for l in lines if "kd_loss" in l)
  teacher_final = _final_model(str(tmp_path / "teacher"),
                               stages.random_variables(exp, "teacher"))
  np.testing.assert_array_equal(teacher_final["params"]["section2_module1"]["conv1"][
      "kernel"], pretrained["params"]["section2_module1"]["conv1"]["kernel"])
  assert teacher_final["params"]["classifier"]["kernel"].shape == (64 * 2, 10)
  template = stages.random_variables(exp, "student")
  for stage1, stage2 in (("fsp", "student"), ("fitnet_hint", "fitnet")):
    a = _final_model(str(tmp_path / stage1), template)
    b = _final_model(str(tmp_path / stage2), template)
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    # The stage-1 objective's own parameters were trained and saved apart.
    stage = next(s for s in exp.stages if s.name == stage1)
    initial = stages.initial_distiller_params(exp, stage, exp.objective(stage))
    with checkpoints.manager(str(tmp_path / stage1)) as mngr:
      saved = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
          distiller=ocp.args.StandardRestore(initial))).distiller
    changed = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))),
                           initial, saved)
    assert jax.tree.leaves(changed) and all(jax.tree.leaves(changed))


class _Interrupt(Exception):
  pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
  config = tiny_config()
  config.baselines = ()
  train.run(config, str(tmp_path / "clean"))

  # Interrupt stage 1 after its 6th step (last checkpoint at step 4).
  real = data.train_batches

  def interrupted(*args, **kwargs):
    for step, batch in real(*args, **kwargs):
      if step == 6 and _stage[0] == "fsp":
        raise _Interrupt()
      yield step, batch

  _stage = [None]
  real_stage = train.train_and_evaluate

  def train_and_evaluate(stage, *args):
    _stage[0] = stage.name
    return real_stage(stage, *args)

  monkeypatch.setattr(data, "train_batches", interrupted)
  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  with pytest.raises(_Interrupt):
    train.run(config, str(tmp_path / "resumed"))
  assert json.load(open(tmp_path / "resumed" / "results.json")).keys() == {"teacher"}
  monkeypatch.setattr(data, "train_batches", real)
  resumed = train.run(config, str(tmp_path / "resumed"))

  clean = json.load(open(tmp_path / "clean" / "results.json"))
  for name in ("teacher", "fsp", "student"):
    for key in ("test_accuracy", "test_fsp_loss"):
      if key in clean[name]:
        np.testing.assert_allclose(resumed[name][key], clean[name][key], rtol=1e-5)
  template = stages.random_variables(stages.setup(config, str(tmp_path / "clean")),
                                     "student")
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
    (["--config=configs/no_such_config.py"], "cannot load the --config"),
    (["--config=no_such_config"], "unknown config 'no_such_config'"),
    (["--config=quickstart:bogus"], "unknown config argument 'bogus'"),
    (["--config.student.schedule.boundaries=(1,2)"],
     "student.schedule: 2 learning rates need 1 boundaries; got 2"),
    (["--config.data.source=tfds", "--config.data.name=no_such_dataset_xyz"],
     "unknown tensorflow-datasets data set"),
    (["--config.data.source=imagenet_csv"],
         "--config.data.source='imagenet_csv' is unknown; choose from"),
    (["--config.data.source=folder", "--config.data.root=FOLDER"],
     "is not a readable image"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"], "teacher checkpoint"),
    (["--config.teacher.width_multiplier=2"], "cannot be paired for stage 'fsp'"),
    (["--config.fsp.fsp_pairs=((0,9),)"], "fsp.fsp_pairs entry 9 is out of range"),
    (["--config.fsp.fsp_pairs=(('stem','sektion1'),)"],
     "fsp.fsp_pairs entry 'sektion1' is not a feature"),
    (["--config.teacher.model=cifar_resnet27"], "unknown model"),
    (["--num_processes=2"], "go together"),
    (["--config.methods=('fitnet', 'bogus')"], "unknown distillation method 'bogus'"),
    (["--config.methods=('kd',)", "--config.teacher.num_classes=3"],
     "teacher.num_classes=3 differs"),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, cli_env, args, message):
  if any("FOLDER" in a for a in args):
    from test_data import _write_folder
    root = _write_folder(tmp_path / "images")
    with open(os.path.join(root, "test", "dog", "broken.jpg"), "w") as f:
      f.write("not a jpeg")
    args = [a.replace("FOLDER", root) for a in args]
  workdir = tmp_path / "w"
  proc = _cli(cli_env, "--config", "quickstart:smoke", "--workdir", str(workdir), *args)
  _assert_one_line_error(proc, message)
  assert not os.path.exists(workdir / "teacher")  # Refused before anything was written.


def test_cli_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cli_env):
  # The learning rate explodes after step 8: the loss is NaN at step 11, between the
  # log steps (every 4), and is still reported at its exact step.
  workdir = tmp_path / "w"
  proc = _cli(cli_env, "--config", "quickstart:smoke",
              "--workdir", str(workdir), "--config.teacher_only=True",
              "--config.teacher.schedule.learning_rates=(0.1,1e30)")
  _assert_one_line_error(proc, "[teacher] the loss became nan at step 11; training "
                         "stopped and the last good checkpoint (step 8) is kept")
  assert "--config.teacher.schedule.learning_rates" in proc.stderr
  stage_dir = workdir / "teacher"
  assert sorted(os.listdir(stage_dir / checkpoints.CHECKPOINT_DIR)) == ["4", "8"]
  template = stages.abstract_variables(stages.setup(tiny_config(), str(tmp_path / "other")),
                                      "teacher")
  variables, step = checkpoints.restore_model(str(stage_dir), template)
  assert step == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert not os.path.exists(workdir / metrics.RESULTS)


def test_cli_default_config_with_a_typo_is_a_one_line_error(tmp_path, cli_env):
  proc = _cli(cli_env, "--workdir", str(tmp_path / "w"), "--config.no_such_field=1")
  _assert_one_line_error(proc, "unknown config field 'no_such_field'")
