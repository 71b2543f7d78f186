"""The zoo's table (experiments/zoo.py): its rows, their configs and schedules, and the
report and results.json it writes, without training (its runner is the reproduction
grid's, tested in test_reproduce.py)."""
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments/ is a folder of the checkout, not of the package.

from conftest import write_run  # noqa: E402
from experiments import zoo  # noqa: E402
from fsp_jax import methods, stages  # noqa: E402


def _args(tmp_path, *extra):
  return zoo.parse_args(["--workdir", str(tmp_path / "w"), "--data_root", "",
                         "--report_dir", str(tmp_path / "r"), "--scale", "0.01",
                         *extra])


def test_every_row_trains_the_same_main_task_from_one_teacher(tmp_path):
  args = _args(tmp_path)
  plan = {run.name: run for run in zoo.grid_plan(args)}
  assert list(plan) == ["teacher"] + [r.replace("+", "_") for r in zoo.ROWS]
  assert set(zoo.ROWS) == {"scratch", "fsp_mean"} | set(
      m.name for m in methods.BUILTIN) | {"crd+kd"}
  teacher = stages.plan_stages(plan["teacher"].config)
  assert [s.name for s in teacher] == ["teacher"]
  assert teacher[0].schedule.num_steps == 3200  # 64k x 0.05: 79 % in docs/reproduction.
  teacher_dir = os.path.join(str(tmp_path / "w"), "teacher", "teacher")
  for row in zoo.ROWS:
    run = plan[row.replace("+", "_")]
    config = run.config
    planned = {s.name: s for s in stages.plan_stages(config)}
    main = planned[zoo.row_stage(row)]
    # The same main task for every row: Table 3's schedule x 0.01, ResNet-8, 3 seeds.
    assert (main.schedule.num_steps, main.schedule.boundaries) == (640, (320, 480)), row
    assert main.schedule.batch_size == 128 and config.num_seeds == 3
    assert config.student.model == "cifar_resnet8"
    assert config.teacher.model == "cifar_resnet26"
    assert "teacher" not in planned, row  # Every row reads the one teacher.
    # Every row after the teacher, scratch too: the teacher trains alone on every core.
    assert run.after == ("teacher",), row
    if row == "scratch":
      assert set(planned) == {"scratch"}
    else:
      assert config.teacher.checkpoint == teacher_dir
      method = methods.get(zoo.row_method(row))
      assert set(planned) == set(method.stage_names()), row
  # FSP with the element-mean stage 1 at its learning rate; the paper's row keeps Eq. 2.
  assert plan["fsp_mean"].config.fsp.reduction == "mean"
  assert plan["fsp_mean"].config.fsp.schedule.learning_rates == (0.05, 0.005, 5e-4)
  assert plan["fsp"].config.fsp.reduction == "sum"
  assert _args(tmp_path, "--rows", "kd,crd+kd").rows == ["kd", "crd+kd"]
  with pytest.raises(SystemExit):
    _args(tmp_path, "--rows", "kd,bogus")


def _classify(accs, ensemble, steps=640):
  return {"kind": "classify", "model": "m", "steps": steps, "wall_time_s": 120.0,
          "test_accuracy": float(np.mean(accs)),
          "test_accuracy_std": float(np.std(accs, ddof=1)),
          "ensemble_test_accuracy": ensemble,
          "per_seed": [{"seed": s, "test_accuracy": a} for s, a in enumerate(accs)]}


def test_report_and_results_json(tmp_path):
  wd = str(tmp_path / "w")
  write_run(wd, "teacher", {"teacher": {**_classify([0.8, 0.8], None, 3200),
                                     "test_accuracy": 0.79}})
  per_seed = lambda accs: [{"seed": s, "test_accuracy": a}  # noqa: E731
                           for s, a in enumerate(accs)]
  write_run(wd, "scratch", {"scratch": _classify([0.60, 0.62, 0.61], 0.64)})
  write_run(wd, "crd_kd", {"crd+kd": _classify([0.70, 0.72, 0.74], 0.75)},
         {"crd+kd": [{"step": 320, "test_accuracy": 0.7,
                      "per_seed": per_seed([0.71, 0.80, 0.60])},
                     {"step": 640, "test_accuracy": 0.72,
                      "per_seed": per_seed([0.70, 0.72, 0.74])}]})
  write_run(wd, "fsp_mean", {"fsp": {"kind": "fsp", "steps": 210, "wall_time_s": 1.0},
                          "student": _classify([0.65, 0.66, 0.67], 0.69)})
  bench = tmp_path / "bench.json"
  step = lambda method, ms: {"method": method, "kind": "classify",  # noqa: E731
                              "batch_size": 128, "ms_per_step": ms,
                              "seed_images_per_s": 384e3 / ms, "step_over_kd": ms / 170}
  bench.write_text("log line\n" + json.dumps({"steps": {
      "scratch": step("scratch", 100.0), "kd": step("kd", 170.0),
      "crd+kd": step("crd+kd", 230.0), "student": step("fsp", 101.0),
      "fsp": step("fsp", 180.0)}}))
  args = _args(tmp_path, "--bench", str(bench))
  text = zoo.write(args, "python experiments/zoo.py --scale 0.01")
  results = json.load(open(tmp_path / "r" / "results.json"))
  assert set(results) == {"scratch", "crd+kd", "fsp_mean"}
  crd = results["crd+kd"]
  assert crd["seeds"] == [70.0, 72.0, 74.0]
  assert (crd["mean"], crd["std"], crd["ensemble"]) == (72.0, 2.0, 75.0)
  assert crd["step_time_ratio"] == 2.3
  # Best evaluation: each seed's best (seed 1's at step 320), then the mean.
  assert crd["best_eval"] == pytest.approx(np.mean([71, 80, 74]), abs=0.01)
  assert results["fsp_mean"]["step_time_ratio"] == 1.01
  assert results["fsp_mean"]["stage_one_step_time_ratio"] == 1.8
  assert results["scratch"]["step_time_ratio"] == 1.0
  assert "crd.weight 0.8" in crd["weight"] and "kd." in crd["weight"]
  assert "**79.00 %** after 3200 iterations" in text
  assert "| crd+kd | 72.00 ± 2.00 | 75.00 | 75.00 | 72.00 | 2.30x |" in text
  assert "| 75.46 | 71.63 |" in text  # The CRD paper's CIFAR-100 CRD+KD, beside it.
  assert "| kd | not finished |" in text
  assert (tmp_path / "r" / "accuracy_vs_iteration.png").exists()
  # Each step's cost, and why one over 1.25x KD's costs what it does.
  assert "| crd+kd | crd+kd | 128 | 230 | 1670 | 1.35x | 2.30x |" in text
  assert "Over 1.25x KD's step: crd+kd (1.35x)." in text
  assert "- crd: scoring every example against the other side's memory bank" in text


def test_ranking_against_the_published_order():
  """Ranks, Spearman's rho and the rows not clear of scratch, from the table."""
  row = lambda mean, std=0.5: {"mean": mean, "std": std, "steps": 512}  # noqa: E731
  # Published 32x4->8x4: crd 75.51 > kd 73.33 > fsp 72.62 > scratch 72.50.
  table = {"scratch": row(60.0), "kd": row(60.2), "fsp": row(63.0), "crd": row(62.0),
           "fsp_mean": row(64.0)}
  rank = zoo.ranking(table)
  assert rank["rows"] == ["fsp", "crd", "kd", "scratch"]  # fsp_mean: nothing published
  first = rank["resnet32x4->resnet8x4"]
  # Ours 1..4 = fsp, crd, kd, scratch; theirs = crd, kd, fsp, scratch: d = 2, 1, 1, 0.
  assert first["spearman"] == pytest.approx(1 - 6 * (4 + 1 + 1) / (4 * 15), abs=1e-3)
  assert first["shift"] == {"fsp": 2.0, "crd": -1.0, "kd": -1.0, "scratch": 0.0}
  # kd is 0.2 above scratch, less than 2 x 0.5 / sqrt(3) = 0.58.
  assert rank["not_above_scratch"] == ["kd"]
  assert zoo.spearman({"a": 1, "b": 2, "c": 3}, {"a": 30, "b": 20, "c": 10}) == -1.0
  text = "\n".join(zoo.ranking_lines(table))
  assert "fsp 63.00 > crd 62.00 > kd 60.20 > scratch 60.00" in text
  assert "**+0.40** (resnet32x4 -> resnet8x4)" in text
  assert "each student trains 512 iterations" in text
  assert zoo.ranking_lines({"scratch": row(60.0)}) == []
