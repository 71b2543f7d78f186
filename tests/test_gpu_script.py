"""The prepared GPU run (benchmarks/gpu/run.sh) runs end to end at a tiny scale on the
CPU, so that device minutes are never spent on a typo."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_dry_run(tmp_path, cli_env):
  from conftest import with_devices
  out = tmp_path / "gpu"
  # One device, as on the one GPU the script is for (no program of it is partitioned:
  # 92 s against 112 s on 2 fake devices; the data-parallel steps are tested elsewhere).
  env = dict(with_devices(cli_env, 1), DRY_RUN="1", OUT=str(out), PYTHON=sys.executable,
             PART="tables,zoo")
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu", "run.sh")],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name in ("bench_f32.json", "bench_bf16.json", "bench_loop.json", "torch.json",
               "summary.md"):
    assert (out / name).exists(), name
  loop = json.loads((out / "bench_loop.json").read_text().strip().splitlines()[-1])
  assert set(loop["modes"]) == {"host_1_step_per_call", "host_2_steps_per_call",
                                "device_2_steps_per_call"}
  table3 = json.load(open(out / "table3" / "results.json"))
  assert set(table3) == {"teacher", "fsp", "student", "scratch"}
  assert [p["seed"] for p in table3["student"]["per_seed"]] == [0, 1, 2]
  summary = (out / "summary.md").read_text()
  assert "### table3" in summary and "88.7" in summary and "### table1" in summary
  # The zoo: one teacher, then kd, fsp, at, crd, dkd and scratch, 3 seeds each, on
  # RepDistiller's recipe, beside its published CIFAR-100 numbers.
  zoo = json.load(open(out / "zoo" / "results.json"))
  assert set(zoo) == {"teacher", "kd", "fsp", "student", "at", "crd", "dkd", "scratch"}
  for stage in ("kd", "student", "at", "crd", "dkd", "scratch"):
    assert [p["seed"] for p in zoo[stage]["per_seed"]] == [0, 1, 2], stage
  assert zoo["scratch"]["steps"] == 2  # 187,500 x the dry run's 1e-5.
  assert "### zoo" in summary and "75.51" in summary and "76.32" in summary
