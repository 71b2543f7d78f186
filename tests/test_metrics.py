"""Metrics: JSON lines and TensorBoard event files read back by TensorBoard's reader."""
import json
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator

from fsp_jax import metrics


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
  scalars = _scalars(str(tmp_path))
  assert scalars["train/fsp_loss"] == [(5, 900.0)]
  assert scalars["test/fsp_loss"] == [(5, 800.0)]
  assert "train/loss" not in scalars


def test_resume_drops_records_after_the_checkpoint_in_both_formats(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), 0)
  for step in (4, 8, 12):
    writer.write({"step": step, "loss": float(step)})
  # A kill cut the last event record and JSON line.
  event_file, = tmp_path.glob(metrics.EVENTS_PATTERN)
  with open(event_file, "ab") as f:
    f.write(b"\x20\x00\x00")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "lo')
  resumed = metrics.MetricsWriter(str(tmp_path), 8)
  resumed.write({"step": 12, "loss": 120.0})
  assert len(list(tmp_path.glob(metrics.EVENTS_PATTERN))) == 1
  assert _scalars(str(tmp_path))["train/loss"] == [(4, 4.0), (8, 8.0), (12, 120.0)]
  assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(resumed.path)] == [
      (4, 4.0), (8, 8.0), (12, 120.0)]
  # A fresh start (step 0) clears both.
  metrics.MetricsWriter(str(tmp_path), 0)
  assert _scalars(str(tmp_path)) == {}
  assert metrics.read_jsonl(resumed.path) == []


def test_writing_needs_no_tensorflow(tmp_path):
  import subprocess
  import sys
  code = ("import sys; from fsp_jax import metrics; "
          "metrics.MetricsWriter(sys.argv[1], 0).write({'step': 1, 'loss': 1.0}); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=repo,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
