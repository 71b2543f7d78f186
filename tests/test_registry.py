"""The method registry: a method is one file (or one block), found by name or import
path; no module outside fsp_jax/methods/ names a particular one."""
import json
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from conftest import REPO, quick_compile
from fsp_jax import config_lib, methods, metrics, stages, validation

DOC = os.path.join(REPO, "docs", "methods.md")


def _add_a_method_block():
  text = open(DOC).read()
  section = text[text.index("## Add a method"):]
  section = section[:section.index("\n## ", 1)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1, "the section has one Python block"
  return blocks[0]


def test_add_a_method_block_runs_as_written(tmp_path, cli_env):
  block = _add_a_method_block()
  proc = subprocess.run([sys.executable, "-c", block], cwd=str(tmp_path), env=cli_env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {line.split("  ")[0]: line.split() for line in proc.stdout.splitlines()}
  assert "teacher" in rows, proc.stdout
  # Its student's row: the smoke config's 8 main-task steps.
  _, _, _, model, steps, accuracy, _ = rows["student matching logits"]
  assert (model, steps) == ("cifar_resnet8", "8") and float(accuracy) > 10.0


MY_METHOD = textwrap.dedent('''
    import dataclasses
    import jax.numpy as jnp
    import ml_collections
    from fsp_jax import methods

    @dataclasses.dataclass(frozen=True)
    class Match(methods.Objective):
      weight: float = 1.0
      name = "my_match"
      label = "my match"
      section = "my_match"

      @classmethod
      def from_config(cls, section, feature_names=(), num_steps=1):
        return cls(section.weight)

      def teacher_targets(self, logits, features):
        return logits

      def objective(self, params, targets, logits, features, step):
        return self.weight * jnp.mean(jnp.square(logits - targets), axis=-1)

    def make():
      return methods.Method(name="my_match", section="my_match", label="my student",
                            student_stage="my_student", term=Match,
                            defaults=lambda: ml_collections.ConfigDict({"weight": 0.5}))
    ''')


def test_a_method_by_import_path_runs_through_the_command_line(tmp_path, cli_env,
                                                               smoke_teacher):
  (tmp_path / "mymethod.py").write_text(MY_METHOD)
  # It compares no two programs' numbers.
  env = dict(quick_compile(cli_env), PYTHONPATH=str(tmp_path))
  base = [sys.executable, "-m", "fsp_jax.main", "--config", "quickstart:smoke",
          "--config.baselines=()", f"--config.teacher.checkpoint={smoke_teacher}"]
  proc = subprocess.run(base + ["--workdir", str(tmp_path / "w"),
                                "--config.methods=('kd', 'mymethod:make')"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "w" / "results.json"))
  assert set(results) == {"kd", "my_student"}
  assert "my student" in proc.stdout  # Its label in the table.
  records = metrics.read_jsonl(str(tmp_path / "w" / "my_student" / metrics.JSONL))
  assert any("my_match_loss" in r and "task_loss" in r for r in records)
  info = json.load(open(tmp_path / "w" / "my_student" / "stage.json"))
  assert info["fingerprint"]["distill"] == {"method": "my_match", "weight": 0.5}
  # A name the module lacks, and a module that is not there: one line, exit 2.
  for entry, says in (("mymethod:nope", "module 'mymethod' has no 'nope'"),
                      ("nomodule:M", "cannot import 'nomodule'")):
    bad = subprocess.run(base + ["--workdir", str(tmp_path / "bad"),
                                 f"--config.methods=('{entry}',)"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and says in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def _term_method(name, **kw):
  return methods.Method(**{**dict(name=name, section=name, label=name,
                                  student_stage=name, term=methods.KD,
                                  defaults=ml_collections.ConfigDict), **kw})


def test_register_refuses_clashes_and_finds_methods_by_name():
  assert [m.name for m in methods.BUILTIN] == ["fsp", "fitnet", "kd", "at", "sp", "pkt",
                                             "rkd", "nst", "cc", "vid", "ab", "ft", "crd",
                                               "dkd"]
  with pytest.raises(validation.ConfigError, match="registered already"):
    methods.register(_term_method("kd"))
  with pytest.raises(validation.ConfigError, match="section 'fsp' is method 'fsp'"):
    methods.register(_term_method("other", section="fsp"))
  with pytest.raises(validation.ConfigError, match="stage 'student' is method 'fsp'"):
    methods.register(_term_method("other2", student_stage="student"))
  with pytest.raises(validation.ConfigError, match="neither a stage 1 nor a term"):
    methods.Method(name="x", section="x", label="x", student_stage="x",
                   defaults=dict)
  with pytest.raises(validation.ConfigError, match="unknown distillation method 'atx'"):
    methods.get("atx")
  assert methods.get("fitnet") is methods.BUILTIN[1]


def test_stages_follow_the_builtin_order_and_sections_are_added():
  config = config_lib.load("quickstart:smoke")
  config.methods = ("kd", "fsp")
  assert [s.name for s in stages.plan_stages(config)] == [
      "teacher", "fsp", "student", "kd", "scratch"]
  mine = methods.register(_term_method("registry_test_term"))
  config.methods = ("registry_test_term",)
  assert "registry_test_term" not in config
  plan = stages.plan_stages(config)
  assert "registry_test_term" in config  # Its defaults, added.
  assert [(s.name, s.distill, s.method) for s in plan][1] == (
      "registry_test_term", "kd", "registry_test_term")
  assert methods.for_config(config) == (mine,)


def test_a_methods_own_checks_apply_to_its_section():
  config = config_lib.load("quickstart:smoke")
  config.fitnet.pool = "median"
  with pytest.raises(validation.ConfigError, match=r"config.fitnet.pool='median'"):
    validation.check_config(config)  # Checked even where fitnet is not run.
  config.fitnet.pool = "avg"
  config.fsp.reduction = "total"
  with pytest.raises(validation.ConfigError, match=r"config.fsp.reduction='total'"):
    stages.plan_stages(config)


def test_no_module_outside_methods_names_fitnet():
  package = os.path.join(REPO, "fsp_jax")
  naming = [name for name in sorted(os.listdir(package)) if name.endswith(".py")
            and re.search("fitnet", open(os.path.join(package, name)).read(), re.I)]
  assert naming == [], naming
