"""Command line: `python -m fsp_jax.main --config configs/NAME.py --workdir DIR`.

Override any config field with `--config.FIELD=VALUE`, e.g.
`--config.student.schedule.num_steps=1000`. Without `--config`, runs the quickstart
(bundled data, whole pipeline, a few minutes on a laptop CPU).

Several hosts: run the same command on every host with `--distributed` (Cloud TPU
pods, SLURM and other clusters JAX detects), or with `--coordinator_address`,
`--num_processes` and `--process_id`. Exit status: 0 done, 2 bad input (one line
`fsp_jax: error: ...`), 143 stopped by SIGTERM after saving (run it again to resume).
"""
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs", "quickstart.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/quickstart",
                    "Directory for checkpoints, metrics and results.json.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() and let JAX find the cluster "
                  "(Cloud TPU pods, SLURM, Open MPI, Kubernetes).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process run without cluster "
                    "detection (with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process run).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a launcher expects of a terminated job.


def _fail(message: str):
  print(f"fsp_jax: error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv):
  """absl's parser, with bad flags and config fields as one-line errors."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("seed")  # Loads the config file now, so a bad path fails here.
  except flags.Error as e:
    _fail(f"{_one_line(e)}; see --helpfull for the flags.")
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field.
    text = str(e)
    key = re.search(r"[A-Za-z_]\w*", text)
    key = key.group() if key else text
    args = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
    where = f" in {args[0]}" if args else ""
    guess = re.search(r'Did you mean \W*"(\w+)\W*"', text)
    fix = f"did you mean {guess.group(1)!r}? " if guess else ""
    _fail(f"unknown config field {key!r}{where}; {fix}the fields are those of "
          "fsp_jax/config_lib.py.")
  except (OSError, ImportError, SyntaxError) as e:
    _fail(f"cannot load the --config file: {_one_line(e)}; give a path such as "
          "configs/quickstart.py.")
  return rest


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return " ".join(lines[:4]) if lines else type(e).__name__


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize from the flags; nothing without them."""
  explicit = {"coordinator_address": FLAGS.coordinator_address,
              "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and len(given) != 3:
    missing = sorted(set(explicit) - set(given))
    _fail(f"--coordinator_address, --num_processes and --process_id go together; "
          f"missing {', '.join('--' + m for m in missing)}.")
  if not given and not FLAGS.distributed:
    return
  try:
    jax.distributed.initialize(**given)
  except (ValueError, RuntimeError) as e:
    how = ("check that process 0 runs and that host:port is reachable" if given else
           "no cluster was detected; give --coordinator_address, --num_processes and "
           "--process_id")
    _fail(f"jax.distributed.initialize failed ({_one_line(e)[:200]}); {how}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Progress lines from fsp_jax (process 0); libraries (Orbax, JAX) only when they warn.
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Imported after flags are parsed so that XLA_FLAGS etc. set by launchers apply.
  import jax
  _initialize_distributed(jax)
  logging.getLogger("fsp_jax").setLevel(
      logging.INFO if jax.process_index() == 0 else logging.WARNING)
  from fsp_jax import pipeline
  try:
    results = pipeline.run(FLAGS.config, FLAGS.workdir)
  except pipeline.Preempted as e:
    print(f"fsp_jax: {e} Run the same command to resume.", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    _fail(" ".join(str(e).split()))  # One line, whatever the library wrote.
  if jax.process_index() == 0:
    print(pipeline.results_table(results))
    print(f"results: {os.path.join(os.path.abspath(FLAGS.workdir), pipeline.RESULTS)}")


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
