"""The Colab notebook runs top to bottom (on the CPU, with its small settings)."""
import json
import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "fsp_colab.ipynb")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  # The kernel inherits this environment.
  monkeypatch.setenv("FSP_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("FSP_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # One device: data parallelism is tested elsewhere; this keeps the run short.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "devices: [CpuDevice(id=0)" in text
  assert "max |G - loop|" in text and "FSP student (stage 2)" in text
  assert "after stage 1" in text
  images = sum("image/png" in o.get("data", {}) for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)
  assert images == 3  # FSP matrices at init, accuracy curves, teacher vs student.
  results = json.load(open(workdir / "results.json"))
  assert set(results) == {"teacher", "fsp", "student"}
