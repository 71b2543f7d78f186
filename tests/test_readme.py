"""The README's set-up commands are what CI runs (.ci/run reads them from README.md)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, ".ci"))
import readme_commands  # noqa: E402


def test_readme_holds_the_two_setup_commands_ci_runs():
  with open(os.path.join(REPO, "README.md")) as f:
    commands = readme_commands.setup_commands(f.read())
  assert len(commands) == 2, commands
  install_and_run, install_and_test = commands
  assert install_and_run.endswith(".venv/bin/python -m fsp_jax.main")
  assert " install . " in f" {install_and_run} "  # A plain (wheel) install.
  assert install_and_test.endswith(".venv/bin/python -m pytest")
  assert "install -e '.[test]'" in install_and_test
  for n, command in enumerate(commands, 1):
    out = subprocess.run([sys.executable, os.path.join(REPO, ".ci", "readme_commands.py"),
                          str(n)], capture_output=True, text=True, check=True).stdout
    assert out == command + "\n"


def test_ci_runs_the_readme_commands_in_fresh_clones():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    script = f.read()
  assert "readme_commands.py" in script and "git clone" in script
  assert 'bash -c "$command"' in script
  assert "workdirs/quickstart/results.json" in script


def test_setup_commands_are_read_from_the_setup_section_only():
  text = ("# x\n\n    python3 -m venv .venv && a\n\n## Set up\n\n"
          "    python3 -m venv .venv && b\n\ntext\n\n    python3 -m venv .venv && c\n"
          "    pip install x\n\n## Configs\n\n    python3 -m venv .venv && d\n")
  assert readme_commands.setup_commands(text) == ["python3 -m venv .venv && b",
                                                 "python3 -m venv .venv && c"]


def test_configs_load_from_the_source_tree_root():
  """From a clone's root `python -m` imports the source folder, not an installed copy:
  the configs must be found there too (fsp_jax/configs links to configs/)."""
  proc = subprocess.run(
      [sys.executable, "-c", "import fsp_jax, fsp_jax.configs.quickstart as q; "
       "print(fsp_jax.__file__); print(q.get_config().teacher.model)"],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
  assert proc.returncode == 0, proc.stderr
  path, model = proc.stdout.split()
  assert path == os.path.join(REPO, "fsp_jax", "__init__.py")
  assert model == "cifar_resnet14"
