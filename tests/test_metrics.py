"""Metrics: JSON lines and TensorBoard event files read back by TensorBoard's reader."""
import json
import os
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

from fsp_jax import metrics

EVENTS = "events.out.tfevents.*"  # tensorboardX's event file names.


def _scalars(log_dir):
  acc = event_accumulator.EventAccumulator(log_dir)
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


def test_tags_name_the_stage_kinds_loss():
  assert metrics.tensorboard_tag("test_accuracy") == "test/accuracy"
  assert metrics.tensorboard_tag("loss") == "train/loss"
  assert metrics.tensorboard_tag("loss", "fsp") == "train/fsp_loss"
  assert metrics.tensorboard_tag("test_fsp_loss", "fsp") == "test/fsp_loss"
  assert metrics.tensorboard_tag("images_per_s") == "train/images_per_s"


def test_classify_stage_scalars_load_with_tensorboard_reader(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  writer.write({"step": 10, "loss": 2.5, "learning_rate": 0.1, "images_per_s": 300.0,
                "accuracy": 0.25})
  writer.write({"step": 10, "test_accuracy": 0.5, "test_loss": 1.5})
  writer.write({"step": 20, "loss": 1.25, "learning_rate": 0.01, "images_per_s": 310.0,
                "accuracy": 0.75})
  writer.close()  # As a stage ends.
  scalars = _scalars(str(tmp_path))
  assert set(scalars) == {"train/loss", "train/learning_rate", "train/images_per_s",
                          "train/accuracy", "test/accuracy", "test/loss"}
  assert scalars["train/loss"] == [(10, 2.5), (20, 1.25)]
  assert scalars["test/accuracy"] == [(10, 0.5)]
  assert scalars["train/learning_rate"][1] == (20, pytest.approx(0.01))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [10, 10, 20]


def test_fsp_stage_loss_has_its_own_tag(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0, kind="fsp")
  writer.write({"step": 5, "loss": 900.0, "learning_rate": 1e-3, "images_per_s": 50.0})
  writer.write({"step": 5, "test_fsp_loss": 800.0})
  writer.close()
  scalars = _scalars(str(tmp_path))
  assert scalars["train/fsp_loss"] == [(5, 900.0)]
  assert scalars["test/fsp_loss"] == [(5, 800.0)]
  assert "train/loss" not in scalars


def test_a_written_record_is_in_the_event_file_at_once(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  for step in (4, 8):
    writer.write({"step": step, "loss": float(step)})
  assert _scalars(str(tmp_path)).get("train/loss") == [(4, 4.0), (8, 8.0)]
  writer.close()


def test_resume_drops_records_after_the_checkpoint_in_both_formats(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  for step in (4, 8, 12):
    writer.write({"step": step, "loss": float(step)})
    writer.write({"step": step, "test_accuracy": step / 100})
  writer.close()
  # A kill cut the last event record and JSON line.
  event_file, = tmp_path.glob(EVENTS)
  with open(event_file, "ab") as f:
    f.write(b"\x20\x00\x00")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "lo')
  # Resumed from the checkpoint at step 8: steps 9.. run again, with other values.
  resumed = metrics.MetricsWriter(str(tmp_path), 8)
  for step in (12, 16):
    resumed.write({"step": step, "loss": 10.0 * step})
  resumed.write({"step": 16, "test_accuracy": 0.5})
  resumed.close()
  # TensorBoard shows steps <= 8 from before the kill, each once, then the new ones.
  scalars = _scalars(str(tmp_path))
  assert scalars["train/loss"] == [(4, 4.0), (8, 8.0), (12, 120.0), (16, 160.0)]
  assert scalars["test/accuracy"] == [(4, pytest.approx(0.04)), (8, pytest.approx(0.08)),
                                      (16, 0.5)]
  assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(resumed.path)
          if "loss" in r] == [(4, 4.0), (8, 8.0), (12, 120.0), (16, 160.0)]
  assert [r["step"] for r in metrics.read_jsonl(resumed.path)] == [4, 4, 8, 8, 12, 16, 16]


def test_resumes_after_resumes_keep_each_step_once(tmp_path):
  """Killed twice: the newest event file's purge applies to all older files."""
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  for step in (4, 8, 12):
    writer.write({"step": step, "loss": float(step)})
  for start, steps, scale in ((4, (8, 12, 16), 10.0), (12, (16, 20), 100.0)):
    writer.close()
    writer = metrics.MetricsWriter(str(tmp_path), start)
    for step in steps:
      writer.write({"step": step, "loss": scale * step})
  writer.close()
  assert len(list(tmp_path.glob(EVENTS))) == 3
  assert _scalars(str(tmp_path))["train/loss"] == [
      (4, 4.0), (8, 80.0), (12, 120.0), (16, 1600.0), (20, 2000.0)]
  assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(writer.path)] == [
      (4, 4.0), (8, 80.0), (12, 120.0), (16, 1600.0), (20, 2000.0)]


def test_fresh_start_clears_the_json_lines(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  writer.write({"step": 4, "loss": 4.0})
  writer.close()
  metrics.MetricsWriter(str(tmp_path), 0).close()  # No checkpoint: starts over.
  assert metrics.read_jsonl(writer.path) == []


def test_fresh_start_clears_the_events(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  writer.write({"step": 4, "loss": 4.0})
  writer.close()
  again = metrics.MetricsWriter(str(tmp_path), 0)
  again.write({"step": 4, "loss": 40.0})
  again.close()
  assert _scalars(str(tmp_path))["train/loss"] == [(4, 40.0)]


def test_resume_in_the_same_second_keeps_the_earlier_events(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  for step in (4, 8, 12):
    writer.write({"step": step, "loss": float(step)})
  writer.close()
  resumed = metrics.MetricsWriter(str(tmp_path), 8)
  resumed.write({"step": 12, "loss": 120.0})
  resumed.close()
  assert _scalars(str(tmp_path))["train/loss"] == [(4, 4.0), (8, 8.0), (12, 120.0)]


def _killed_after_the_final_evaluation(tmp_path):
  # Killed after the final checkpoint (step 8) and the final evaluation record, before
  # results.json: the resumed run evaluates again and must not double the record.
  writer = metrics.MetricsWriter(str(tmp_path), 0, final_step=8)
  writer.write({"step": 4, "loss": 4.0})
  writer.write({"step": 4, "test_accuracy": 0.4})
  writer.write({"step": 8, "loss": 8.0})
  writer.write({"step": 8, "test_accuracy": 0.8})
  writer.close()
  resumed = metrics.MetricsWriter(str(tmp_path), 8, final_step=8)
  resumed.write({"step": 8, "test_accuracy": 0.8})
  resumed.close()
  return resumed


def test_resume_at_the_final_step_drops_the_final_evaluation(tmp_path):
  resumed = _killed_after_the_final_evaluation(tmp_path)
  assert metrics.read_jsonl(resumed.path) == [
      {"step": 4, "loss": 4.0}, {"step": 4, "test_accuracy": 0.4},
      {"step": 8, "loss": 8.0}, {"step": 8, "test_accuracy": 0.8}]
  scalars = _scalars(str(tmp_path))
  assert scalars["train/loss"] == [(4, 4.0), (8, 8.0)]  # Steps <= 8 kept.
  assert scalars["test/accuracy"][:2] == [(4, pytest.approx(0.4)),
                                          (8, pytest.approx(0.8))]


def test_resume_at_the_final_step_shows_the_final_evaluation_once(tmp_path):
  _killed_after_the_final_evaluation(tmp_path)
  scalars = _scalars(str(tmp_path))
  assert scalars["test/accuracy"] == [(4, pytest.approx(0.4)), (8, pytest.approx(0.8))]
  assert scalars["train/loss"] == [(4, 4.0), (8, 8.0)]


def test_writing_needs_no_tensorflow(tmp_path):
  import subprocess
  import sys
  code = ("import sys; from fsp_jax import metrics; "
          "metrics.MetricsWriter(sys.argv[1], 0).write({'step': 1, 'loss': 1.0}); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=tmp_path,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
