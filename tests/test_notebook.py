"""The Colab notebook runs top to bottom (on the CPU, with its small settings), against
the installed fsp_jax and its shipped configs."""
import importlib.util
import json
import os

import nbclient
import nbformat

from conftest import quick_compile, with_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "fsp_colab.ipynb")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_uses_the_shipped_config_and_the_library():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert 'config_lib.load("quickstart:smoke" if SMALL else "quickstart")' in code
  assert "train.run(config, WORKDIR)" in code and "metrics.results_table(results)" in code
  # Nothing re-typed from configs/quickstart.py, nothing imported from the checkout.
  for absent in ("cifar_resnet14", "schedule(", "sys.path", "image_size"):
    assert absent not in code, absent


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  # The kernel inherits this environment.
  monkeypatch.setenv("FSP_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("FSP_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # One device: data parallelism is tested elsewhere; this keeps the run short, as do
  # the quicker loop emitters (its numbers are compared with no other program's).
  monkeypatch.setenv("XLA_FLAGS",
                     quick_compile(with_devices(os.environ, 1))["XLA_FLAGS"])
  # The installed package only: the kernel starts outside the checkout, which is not
  # on its path either (the install cell finds fsp_jax installed and skips pip).
  monkeypatch.delenv("PYTHONPATH", raising=False)
  cwd = tmp_path / "kernel_cwd"
  cwd.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  installed = os.path.dirname(importlib.util.find_spec("fsp_jax").origin)
  assert f"from {installed}\n" in text
  assert "shipped configs: " in text and "quickstart" in text
  assert "devices: [CpuDevice(id=0)" in text
  assert "teacher cifar_resnet8, student cifar_resnet8, stages of 12 (teacher)" in text
  assert "max |G - loop|" in text and "FSP student (stage 2)" in text
  assert "after stage 1" in text
  images = sum("image/png" in o.get("data", {}) for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)
  assert images == 3  # FSP matrices at init, accuracy curves, teacher vs student.
  results = json.load(open(workdir / "results.json"))
  assert set(results) == {"teacher", "fsp", "student"}
  assert results["teacher"]["steps"] == 12 and results["student"]["steps"] == 8
