"""Every numeric setting is checked before anything trains, and exit statuses say who
is at fault: the user's settings (one line, status 2) or a bug (traceback, status 1)."""
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from fsp_jax import config_lib, validation
from fsp_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with(config, field, value):
  """A copy of `config` with `field` (dotted) set to `value`."""
  config = ml_collections.ConfigDict(config.to_dict())
  *sections, name = field.split(".")
  node = config
  for s in sections:
    node = node[s]
  node[name] = value
  return config


# (field, bad value, what the message says): every kind of numeric setting of every
# stage and method.
BAD = [
    ("teacher.schedule.num_steps", -5, "an integer >= 1; got -5"),
    ("teacher.schedule.num_steps", 0, "an integer >= 1; got 0"),
    ("student.schedule.batch_size", 0, "an integer >= 1; got 0"),
    ("fsp.schedule.batch_size", -64, "an integer >= 1; got -64"),
    ("fsp.schedule.learning_rates", (-0.1,), "numbers >= 0; got (-0.1,)"),
    ("fitnet.schedule.learning_rates", (0.1, float("nan")), "numbers >= 0"),
    ("student.schedule.learning_rates", (), "is empty"),
    ("teacher.schedule.boundaries", (300, 200), "must increase"),
    ("teacher.schedule.boundaries", (-1, 450), "integers >= 0"),
    ("student.schedule.boundaries", (80,), "3 learning rates need 2 boundaries; got 1"),
    ("student.schedule.momentum", 1.0, ">= 0 and < 1; got 1.0"),
    ("fsp.schedule.momentum", -0.9, ">= 0 and < 1"),
    ("teacher.schedule.weight_decay", -1e-4, ">= 0; got -0.0001"),
    ("student.schedule.eval_every", -2, ">= -1; got -2"),
    ("fsp.schedule.warmup_steps", -1, ">= 0; got -1"),
    ("eval_every", -1, ">= 0; got -1"),
    ("eval_examples", -10, ">= 0"),
    ("eval_batch_size", 0, ">= 1"),
    ("log_every", 0, ">= 1"),
    ("checkpoint_every", -5, ">= 1"),
    ("max_checkpoints_to_keep", 0, "2 keeps a fallback"),
    ("steps_per_call", 0, ">= 1"),
    ("seed", -1, "an integer >= 0; got -1"),
    ("num_seeds", 0, ">= 1"),
    ("schedule_scale", 0.0, "a number > 0; got 0.0"),
    ("schedule_scale", float("inf"), "a number > 0"),
    ("kd.temperature", 0.0, "a number > 0; got 0.0"),
    ("kd.weight", -4.0, "a number > 0; got -4.0"),
    ("kd.final_weight", -1.0, ">= 0 (or None)"),
    ("fsp.weights", (1.0, 0.0, 1.0), "entries must each be a number > 0"),
    ("data.pad", -1, ">= 0"),
    ("data.train_per_class", -3, ">= 0"),
    ("data.image_size", (16,), "() or (height, width)"),
    ("data.image_size", (0, 16), "entries must each be an integer >= 1"),
    ("data.classes", (0, -1), "entries must each be an integer >= 0"),
    ("student.width_multiplier", 0, "an integer >= 1"),
    ("teacher.num_classes", -10, ">= 0"),
    ("fitnet.regressor_kernel", 0, ">= 1"),
    ("seed_axis", "vmapp", "choose from 'auto', 'vmap', 'unrolled'"),
    ("data.pipeline", "gpu", "choose from 'auto', 'host', 'device'"),
    ("fsp.reduction", "avg", "choose from 'sum', 'mean'"),
    ("methods", ("fsp", "atx"), "unknown distillation method 'atx'"),
    ("baselines", ("scratch", "teacher_long"), "unknown baselines ['teacher_long']"),
    ("half_precision", True, None),  # Not numeric: accepted.
]


@pytest.mark.parametrize("field,value,says", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_each_bad_setting_is_one_error_naming_field_value_and_range(field, value, says):
  config = _with(config_lib.load("quickstart"), field, value)
  if says is None:
    validation.check_config(config)
    return
  with pytest.raises(validation.ConfigError) as e:
    validation.check_config(config)
  text = str(e.value)
  assert isinstance(e.value, ValueError)
  assert f"config.{field}" in text and says in text, text
  assert "--config" not in text  # A library user is not told about flags.
  assert e.value.field.startswith(field) or field.startswith(e.value.field)
  assert "\n" not in text


@pytest.mark.parametrize("name", config_lib.names())
def test_every_shipped_config_passes(name):
  validation.check_config(config_lib.load(name))
  validation.check_config(config_lib.load(f"{name}:smoke"))


def test_a_new_methods_section_is_checked_by_its_names():
  """A method's section the package does not know is checked by its fields' names."""
  config = config_lib.load("quickstart")
  with config.unlocked():
    config.mymethod = ml_collections.ConfigDict(dict(
        temperature=4.0, weight=0.8, loss_weight=1.0,
        schedule=default.schedule(10, (0.1,), ())))
  validation.check_config(config)
  for field, value in (("mymethod.temperature", -4.0), ("mymethod.loss_weight", 0.0),
                       ("mymethod.schedule.num_steps", 0),
                       ("mymethod.schedule.momentum", 1.5)):
    with pytest.raises(validation.ConfigError, match=f"config.{field}"):
      validation.check_config(_with(config, field, value))


def test_flag_message_spells_fields_as_flags():
  e = validation.ConfigError("config.kd.weight must be a number > 0; got 0; "
                             "or set config.methods=()\n (see docs).")
  assert validation.flag_message(e) == ("--config.kd.weight must be a number > 0; got 0; "
                                        "or set --config.methods=() (see docs).")
  assert validation.flag_message(ValueError("--config.seed stays")) == "--config.seed stays"


def _cli(args, workdir, code=None):
  entry = ["-c", code] if code else ["-m", "fsp_jax.main"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.run([sys.executable, *entry, "--workdir", str(workdir), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return proc, time.time() - start


@pytest.mark.parametrize("flag,says", [
    ("--config.teacher.schedule.num_steps=-5",
     "--config.teacher.schedule.num_steps must be an integer >= 1; got -5."),
    ("--config.student.schedule.batch_size=0",
     "--config.student.schedule.batch_size must be an integer >= 1; got 0."),
    ("--config.fsp.schedule.learning_rates=(-0.1,)",
     "--config.fsp.schedule.learning_rates must all be numbers >= 0; got (-0.1,)."),
])
def test_bad_flags_exit_2_in_one_line_before_anything_runs(flag, says, tmp_path):
  proc, seconds = _cli([flag], tmp_path / "w")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == f"fsp_jax: error: {says}\n"
  assert proc.stdout == ""
  assert not (tmp_path / "w").exists()  # Nothing written, not even the lock.
  assert seconds < 60  # Before JAX starts: seconds, not a stage's minutes.


_BROKEN = """
import sys
from fsp_jax import main, stages
def plan_stages(config):  # A library bug: an error that is not the user's.
  raise ValueError("internal invariant broken")
stages.plan_stages = plan_stages
sys.argv[0] = "fsp_jax.main"
main.cli()
"""


def test_a_library_bug_shows_its_traceback_with_exit_1(tmp_path):
  proc, _ = _cli(["--config", "quickstart:smoke"], tmp_path / "w", code=_BROKEN)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback (most recent call last)" in proc.stderr
  assert "in plan_stages" in proc.stderr
  assert "ValueError: internal invariant broken" in proc.stderr
  assert "fsp_jax: error:" not in proc.stderr
