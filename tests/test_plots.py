"""On a smoke run of the quickstart: TensorBoard runs per stage, and the plots command."""
import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

from conftest import shared_dir
from fsp_jax import config_lib, plots, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A workdir with teacher, fsp, student and scratch stages (a few steps each):
  the shipped `quickstart:smoke` (digits at 8x8, ResNet-8s, evaluations every 4 steps),
  checkpoints only at the end of a stage."""
  config = config_lib.load("quickstart:smoke")
  assert tuple(config.baselines) == ("scratch",)
  config.checkpoint_every = 100
  # Made once for the session (the test workers share it): the tests only read it.
  workdir = str(shared_dir(tmp_path_factory, "plots_tiny_run",
                           lambda d: train.run(config, str(d))))
  return workdir, json.load(open(os.path.join(workdir, "results.json")))


def test_tensorboard_shows_one_run_per_stage(tiny_run):
  workdir, _ = tiny_run
  mux = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(workdir)
  mux.Reload()
  runs = mux.Runs()
  assert set(runs) == {"teacher", "fsp", "student", "scratch"}
  classify_tags = {"train/loss", "train/accuracy", "train/learning_rate",
                   "train/images_per_s", "test/accuracy", "test/loss"}
  for stage in ("teacher", "student", "scratch"):
    assert set(runs[stage]["scalars"]) == classify_tags, stage
  assert set(runs["fsp"]["scalars"]) == {"train/fsp_loss", "train/learning_rate",
                                         "train/images_per_s", "test/fsp_loss"}
  # The values are the metrics.jsonl values.
  records = [json.loads(l) for l in open(os.path.join(workdir, "student",
                                                      "metrics.jsonl"))]
  want = [(r["step"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "student"))
  acc.Reload()
  got = [(e.step, e.value) for e in acc.Scalars("test/accuracy")]
  assert [s for s, _ in got] == [s for s, _ in want] == [4, 8]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


def test_fsp_snapshots_distance_is_the_runs_test_fsp_loss(tiny_run):
  workdir, results = tiny_run
  snaps = plots.fsp_snapshots(workdir, num_images=10_000)  # The whole test set.
  assert snaps["pairs"] == (("stem", "section1"), ("section1", "section2"),
                            ("section2", "section3"))
  assert [m.shape for m in snaps["teacher"]] == [(16, 16), (16, 32), (32, 64)]
  assert snaps["stage1_step"] == 8
  np.testing.assert_allclose(sum(snaps["distance"]["stage1"]),
                             results["fsp"]["test_fsp_loss"], rtol=1e-4)
  assert all(d > 0 for d in snaps["distance"]["init"])


def test_plots_command_writes_png_figures(tiny_run, tmp_path, capsys):
  workdir, _ = tiny_run
  out = tmp_path / "figures"
  assert plots.main([workdir, "--out", str(out), "--num_images", "64"]) == 0
  for name in ("accuracy.png", "fsp_matrices.png"):
    assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
  printed = capsys.readouterr().out
  assert "FSP distance to the teacher" in printed and "wrote" in printed

  # Two workdirs, one of them without its teacher stage: curves of both, the
  # matrices of the one that has a teacher, and a message naming --teacher.
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  shutil.rmtree(other / "teacher")
  out2 = tmp_path / "figures2"
  assert plots.main([workdir, str(other), "--out", str(out2), "--num_images", "16"]) == 0
  assert sorted(os.listdir(out2)) == ["accuracy.png",
                                      f"fsp_matrices_{os.path.basename(workdir)}.png"]
  assert "--teacher" in capsys.readouterr().err


def test_plots_command_rejects_a_missing_workdir(tmp_path, capsys):
  assert plots.main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
  assert "does not exist" in capsys.readouterr().err
