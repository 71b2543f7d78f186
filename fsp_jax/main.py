"""Command line: `python -m fsp_jax.main --config NAME[:ARG] --workdir DIR`.

`--config` takes a shipped config's name (`cifar10_minimization`), or a path to a
config file, with an optional argument after a colon (`cifar10_minimization:method=
kd`, `quickstart:smoke`); without it, the quickstart runs. Override any config
field with `--config.FIELD=VALUE`, e.g. `--config.student.schedule.num_steps=1000`.

Several hosts: run the same command on every host with `--distributed` (Cloud TPU
pods, SLURM and other clusters JAX detects), or with `--coordinator_address`,
`--num_processes` and `--process_id`.

One run per workdir: a second run on a workdir in use stops at once (status 3, one
line naming the run that holds it), or waits for it with `--wait_for_workdir`.

Every setting is checked before JAX starts (`fsp_jax.validation`). What the user can
fix is one line `fsp_jax: error: ...` on stderr, no traceback; anything else is a bug
and shows its traceback (`--debug` shows tracebacks of every error). Exit status:
  0    done.
  1    an unexpected error, with its traceback: a bug, please report it.
  2    bad input: a config, flag, data set or checkpoint to fix (the line names the
       field, its value and what is allowed); also a missing file and a training
       stopped by a non-finite loss.
  3    the workdir is in use by another run (rerun when it ends, or --wait_for_workdir).
  4    a write failed: full disk, quota, I/O error. Earlier checkpoints and
       results.json are intact; free space and run the same command to resume.
  130  interrupted (Ctrl-C); run the same command to resume.
  143  stopped by SIGTERM after saving; run the same command to resume.
"""
import logging
import os
import re
import sys
import threading

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fsp_jax import config_lib, validation

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
flags.DEFINE_bool("debug", False, "Show Python tracebacks of errors (also those of "
                  "library threads), for developers.")
flags.DEFINE_bool("wait_for_workdir", False,
                  "Where another run uses --workdir, wait until it ends, then go on "
                  "(default: stop at once with exit status 3).")
config_flags.DEFINE_config_file(
    "config", None, "A shipped config's name or a config file, with an optional "
    "argument: NAME[:ARG] or PATH[:ARG]. Default: quickstart.", lock_config=True)

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_WORKDIR_BUSY = 3
EXIT_WRITE_FAILED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT.
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a launcher expects of a terminated job.


def _fail(message: str, status: int = EXIT_BAD_INPUT):
  print(f"fsp_jax: error: {message}", file=sys.stderr)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return " ".join(lines[:4]) if lines else type(e).__name__


def _unknown_field(text: str, argv) -> str:
  """The message for ml_collections' error on an unknown `--config.FIELD` (its text
  holds the field's name and, sometimes, 'Did you mean "..."')."""
  found = re.search(r"[A-Za-z_]\w*", text)
  key = found.group() if found else text
  args = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
  where = f" in {args[0]}" if args else ""
  guess = re.search(r'Did you mean \W*"(\w+)\W*"', text)
  fix = f"did you mean {guess.group(1)!r}? " if guess else ""
  return (f"unknown config field {key!r}{where}; {fix}every field and its default is in "
          "configs/default.py.")


def resolve_config_flag(argv):
  """`argv` with `--config NAME[:ARG]` turned into the config file's path (and the
  quickstart's where no `--config` is given), what ml_collections' flag loads."""
  def resolve(spec):
    config_lib.load(spec)  # A bad name, file or argument fails here, in one line.
    return config_lib.config_file(spec)

  out, given = list(argv[:1]), False
  rest = list(argv[1:])
  while rest:
    a = rest.pop(0)
    if a in ("--config", "-config") and rest:
      out += [a, resolve(rest.pop(0))]
      given = True
    elif a.startswith(("--config=", "-config=")):
      flag, _, value = a.partition("=")
      out.append(f"{flag}={resolve(value)}")
      given = True
    else:
      out.append(a)
  if not given:
    out.insert(1, f"--config={config_lib.config_file('quickstart')}")
  return out


def _parse_flags(argv):
  """absl's parser, with bad flags, configs and config fields as one-line errors."""
  try:
    rest = FLAGS(resolve_config_flag(argv))
    FLAGS.config.get("seed")  # Loads the config file now, so a bad config fails here.
  except flags.Error as e:
    _fail(f"{_one_line(e)}; see --helpfull for the flags.")
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field.
    _fail(_unknown_field(str(e), argv))
  except (ValueError, TypeError, OSError, ImportError, SyntaxError) as e:
    _fail(f"cannot load the --config: {_one_line(e)}")
  return rest


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


class _NoTracebacks(logging.Filter):
  """Library log records as one line: no traceback. Dropped: Orbax's errors that carry
  one (Orbax raises each again, and the CLI reports it in one line) and asyncio's
  ('Task exception was never retrieved': the sibling writes of a failed save)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" or (record.exc_info
                                    and "orbax" in (record.pathname or "")):
      return False
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def _unraisable(hook_args) -> None:
  """Errors Python cannot raise anywhere (asyncio callbacks of Orbax's reads of a
  damaged file, after its event loop closed): not the user's concern."""
  del hook_args


def _thread_error(hook_args) -> None:
  """An uncaught error in a background thread: one line."""
  if issubclass(hook_args.exc_type, SystemExit):
    return
  name = getattr(hook_args.thread, "name", "?")
  print(f"fsp_jax: error: in background thread {name}: "
        f"{_one_line(hook_args.exc_value)[:400]}", file=sys.stderr)


def _hide_tracebacks() -> None:
  """No traceback reaches the user (library threads, asyncio, Orbax's error logs);
  `--debug` keeps Python's defaults."""
  sys.unraisablehook = _unraisable
  threading.excepthook = _thread_error
  quiet = _NoTracebacks()
  for name in ("absl", "asyncio", "jax", "orbax"):
    logging.getLogger(name).addFilter(quiet)
  for handler in logging.getLogger().handlers:  # absl's handler: every record.
    handler.addFilter(quiet)


def _setup_logging(jax) -> None:
  """fsp_jax's lines as plain text on stderr (process 0); libraries only warnings."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("fsp_jax")
  log.propagate = False  # No absl prefix on the lines a user reads.
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
  log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


def _write_failed_message(e: OSError, write_errnos) -> str:
  """One line for a failed file operation (full disk, I/O error) outside a
  checkpoint save (results.json, metrics, stage.json)."""
  where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
  verb = "could not write" if e.errno in write_errnos else "file access failed:"
  reason = e.strerror or _one_line(e)
  return (f"{verb}{where} ({reason}). The run stopped; the checkpoints and "
          "results.json written before are intact (they are replaced atomically). "
          "Free space (or fix the disk or permissions), then run the same command to "
          "resume.")


def _run(jax, train, metrics) -> None:
  from tqdm.contrib.logging import logging_redirect_tqdm
  with logging_redirect_tqdm(loggers=[logging.getLogger("fsp_jax")]):
    results = train.run(FLAGS.config, FLAGS.workdir,
                        wait_for_workdir=FLAGS.wait_for_workdir)
  if jax.process_index() == 0:
    print(metrics.results_table(results))
    print(f"results: {os.path.join(os.path.abspath(FLAGS.workdir), metrics.RESULTS)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:  # Every setting, in seconds, before any device starts.
    from fsp_jax import methods
    validation.check_config(FLAGS.config, methods.for_config(FLAGS.config))
  except validation.ConfigError as e:
    if FLAGS.debug:
      raise
    _fail(validation.flag_message(e))
  if not FLAGS.debug:
    _hide_tracebacks()
  # Imported after flags are parsed so that XLA_FLAGS etc. set by launchers apply.
  import jax

  from fsp_jax import checkpoints, guards, metrics, train, workdir
  _initialize_distributed(jax)
  _setup_logging(jax)
  if not FLAGS.debug:
    _hide_tracebacks()  # Again: absl's handler may be new.
  try:
    _run(jax, train, metrics)
  except guards.Preempted as e:
    print(f"fsp_jax: {e} Run the same command to resume.", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except (validation.ConfigError, workdir.WorkdirBusy, FileNotFoundError,
          FloatingPointError, OSError) as e:  # The user's to fix: one line.
    if FLAGS.debug:
      raise
    message = validation.flag_message(e)  # One line, with the flags' spelling.
    if isinstance(e, workdir.WorkdirBusy):
      _fail(message, EXIT_WORKDIR_BUSY)
    if isinstance(e, checkpoints.CheckpointWriteError):
      _fail(message, EXIT_WRITE_FAILED)
    if isinstance(e, (validation.ConfigError, FileNotFoundError, FloatingPointError)):
      _fail(message)
    _fail(_write_failed_message(e, checkpoints.WRITE_ERRNOS), EXIT_WRITE_FAILED)
  # Any other exception is a bug: Python prints its traceback, exit status 1.
  except KeyboardInterrupt:
    if FLAGS.debug:
      raise
    _fail("interrupted; run the same command to resume from the last checkpoint.",
          EXIT_INTERRUPTED)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
