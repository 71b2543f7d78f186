"""Command line: `python -m fsp_jax.main --config configs/NAME.py --workdir DIR`.

Override any config field with `--config.FIELD=VALUE`, e.g.
`--config.student.schedule.num_steps=1000`. Without `--config`, runs the quickstart
(bundled data, whole pipeline, a few minutes on a laptop CPU).
"""
import logging
import os
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
                  "Call jax.distributed.initialize() (multi-host TPU pods, SLURM).")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Progress lines from fsp_jax; libraries (Orbax, JAX) only when they warn.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("fsp_jax").setLevel(logging.INFO)
  # Imported after flags are parsed so that XLA_FLAGS etc. set by launchers apply.
  import jax
  from fsp_jax import pipeline
  if FLAGS.distributed:
    jax.distributed.initialize()
  try:
    results = pipeline.run(FLAGS.config, FLAGS.workdir)
  except pipeline.Preempted as e:
    print(f"fsp_jax: {e} Run the same command to resume.", file=sys.stderr)
    sys.exit(143)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"fsp_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(pipeline.results_table(results))
    print(f"results: {os.path.join(os.path.abspath(FLAGS.workdir), pipeline.RESULTS)}")


if __name__ == "__main__":
  app.run(main)
