"""Metrics of a stage, progress on the terminal, and the results of a run.

Each stage directory `WORKDIR/<stage>/` gets, from process 0:

- `metrics.jsonl`: one JSON object a line. Training records
  `{"step", "loss", "learning_rate", "images_per_s", "accuracy"}` (stage 1 has no
  accuracy), evaluation records `{"step", "test_accuracy", "test_loss"}` or
  `{"step", "test_fsp_loss"}`.
- `events.out.tfevents.*` (tensorboardX; no TensorFlow needed): the same scalars, so
  that `tensorboard --logdir WORKDIR` shows one run per stage side by side. Tags:
  `train/loss`, `train/accuracy`, `train/learning_rate`, `train/images_per_s`,
  `test/accuracy`, `test/loss`; in stage 1 `train/fsp_loss` and `test/fsp_loss`, so
  that an FSP loss is never drawn in one chart with a cross-entropy.

A stage resumed at step `s` keeps the records of steps `<= s` and drops the rest: the
JSON lines are cut back, and the new event file starts with a purge from step `s + 1`
on, which TensorBoard applies to the older files. The curves have no doubled segments
after a restart. `WORKDIR/results.json` holds each finished stage's final numbers.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, List

import jax

from fsp_jax import checkpoints, methods
from fsp_jax.validation import ConfigError

JSONL = "metrics.jsonl"
RESULTS = "results.json"
log = logging.getLogger("fsp_jax")


def read_jsonl(path: str) -> List[Dict[str, Any]]:
  """The records of a `metrics.jsonl`; a line cut by a kill is skipped."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return records


def tensorboard_tag(key: str, kind: str = "classify") -> str:
  """The TensorBoard tag of a record key: 'test_accuracy' -> 'test/accuracy'.

  Args:
    key: a metrics.jsonl key other than 'step'.
    kind: the stage kind, 'classify' or a stage 1's objective ('fsp'), whose
      training loss is that objective's loss ('train/fsp_loss').
  """
  if key.startswith("test_"):
    return "test/" + key[len("test_"):]
  if key == "loss" and kind != "classify":
    return f"train/{kind}_loss"
  return "train/" + key


class MetricsWriter:
  """A stage's metrics as JSON lines and TensorBoard scalars, from process 0 only.

  A resume at `start_step` drops the records of later steps (written before the
  interruption, after the checkpoint it resumes from) from both; a resume at
  `final_step` also drops that step's evaluation (the final one, written again).
  Events are written synchronously (tensorboardX's `EventsWriter`), so a kill loses
  at most the record being written.
  """

  def __init__(self, stage_dir: str, start_step: int, kind: str = "classify",
               final_step: int = -1):
    """Args: stage_dir: `WORKDIR/<stage>`; start_step: the step the stage starts or
    resumes at (0 for a fresh start); kind: the stage's kind (names the loss);
    final_step: the stage's last step."""
    self.path = os.path.join(stage_dir, JSONL)
    self.kind = kind
    self.enabled = jax.process_index() == 0
    self._events = None
    if not self.enabled:
      return
    from tensorboardX.event_file_writer import EventsWriter  # Only where written.
    from tensorboardX.proto import event_pb2
    os.makedirs(stage_dir, exist_ok=True)
    at_end = start_step == final_step
    kept = []
    if start_step > 0:
      kept = [r for r in read_jsonl(self.path) if r.get("step", 0) < start_step or (
          r.get("step", 0) == start_step and not (at_end and _is_evaluation(r)))]
    # Rewritten aside and renamed: a kill leaves the old file or the new, never none.
    with open(self.path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(self.path + ".tmp", self.path)
    # A new event file (pid and step in its name: never one of an earlier start)
    # that opens with a purge: TensorBoard drops the older files' events from that
    # step on. At the final step the purge takes that step too, whose kept training
    # record is written again (its evaluation is redone).
    self._events = EventsWriter(os.path.join(stage_dir, "events"),
                                f".{os.getpid()}.s{start_step:010d}.fsp_jax")
    purge = start_step if at_end and start_step > 0 else start_step + 1
    self._events.write_event(event_pb2.Event(
        wall_time=time.time(), step=purge,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    for record in kept:
      if at_end and record.get("step") == start_step:
        self._write_events(record)
    self._events.flush()

  def _write_events(self, record: Dict[str, Any]) -> None:
    from tensorboardX.proto import event_pb2, summary_pb2
    values = [summary_pb2.Summary.Value(tag=tensorboard_tag(k, self.kind),
                                        simple_value=float(v))
              for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
    if values:
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(record["step"]),
          summary=summary_pb2.Summary(value=values)))

  def write(self, record: Dict[str, Any]) -> None:
    """Appends `record` (a dict with 'step' and float metrics) to both outputs."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._write_events(record)
    self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _is_evaluation(record: Dict[str, Any]) -> bool:
  return any(k.startswith("test_") for k in record)


class Progress:
  """A stage's progress on process 0: steps, loss, images/s and the time left.

  On a terminal, a tqdm bar; elsewhere (log files, CI, batch jobs) one line per log
  step, e.g. `[fsp] step 200/300 loss 812.3 5,210 img/s ETA 00:02`.
  """

  def __init__(self, stage: str, start: int, total: int, batch_size: int):
    self.stage, self.total, self.batch_size = stage, total, batch_size
    self._t0, self._start = time.time(), start
    self._t, self._step = self._t0, start
    self.enabled = jax.process_index() == 0 and log.isEnabledFor(logging.INFO)
    self.bar = None
    if self.enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, desc=f"[{stage}]", unit="step",
                      file=sys.stderr, dynamic_ncols=True)

  def update(self, step: int, loss: float) -> float:
    """Reports `step`; returns the images/s since the last update."""
    from tqdm import tqdm
    now = time.time()
    images_per_s = (step - self._step) * self.batch_size / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    if self.bar is not None:
      self.bar.set_postfix_str(f"loss {loss:.4g}, {images_per_s:,.0f} img/s",
                               refresh=False)
      self.bar.update(step - self.bar.n)
    elif self.enabled:
      rate = (step - self._start) / max(now - self._t0, 1e-9)
      eta = tqdm.format_interval((self.total - step) / max(rate, 1e-9))
      log.info("[%s] step %d/%d loss %.4g %s img/s ETA %s", self.stage, step,
               self.total, loss, f"{images_per_s:,.0f}", eta)
    return images_per_s

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def read_results(workdir: str) -> Dict[str, Any]:
  """`WORKDIR/results.json`, or `{}` where no stage has finished yet."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); delete it: finished stages are "
                     "then only evaluated again from their final checkpoints.") from None


def write_results(workdir: str, results: Dict[str, Any]) -> None:
  """Replaces `WORKDIR/results.json` atomically."""
  checkpoints.write_json_atomic(os.path.join(workdir, RESULTS), results)


def summary(result: Dict[str, Any]) -> str:
  """One stage's result in words, e.g. 'test accuracy 97.21% after 150 steps, 5 s'."""
  seeds = len(result.get("per_seed", ())) or 1
  if "test_accuracy" in result:
    acc = f"{100 * result['test_accuracy']:.2f}%"
    if seeds > 1:
      acc = (f"{acc} ± {100 * result['test_accuracy_std']:.2f} over {seeds} seeds, "
             f"ensemble {100 * result['ensemble_test_accuracy']:.2f}%")
    return f"test accuracy {acc} after {result['steps']} steps, {result['wall_time_s']:.0f} s"
  key = next((k for k in result if k.startswith("test_") and k.endswith("_loss")),
             "test_loss")
  name = methods.objective_label(key[len("test_"):-len("_loss")])
  over = f" (mean of {seeds} seeds)" if seeds > 1 else ""
  return (f"test {name} loss {result.get(key, float('nan')):.4g}{over} after "
          f"{result['steps']} steps, {result['wall_time_s']:.0f} s")


def results_table(results: Dict[str, Any]) -> str:
  """A small text table: each classification stage's final test accuracy (with
  several seeds: mean ± std over seeds, and the ensemble's)."""
  labels = {"teacher": "teacher", "teacher_short": "teacher, student's schedule",
            "scratch": "student from scratch", **methods.stage_labels()}
  seeds = any("ensemble_test_accuracy" in r for r in results.values())
  rows = [("run", "model", "steps", "test acc %") + (("ensemble %",) if seeds else ())
          + ("time s",)]
  order = ("teacher",) + methods.stage_order() + ("scratch", "teacher_short")
  for name, r in sorted(results.items(), key=lambda kv: (
      order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
    if "test_accuracy" not in r:
      continue
    acc = f"{100 * r['test_accuracy']:.2f}"
    if "test_accuracy_std" in r:
      acc += f" ± {100 * r['test_accuracy_std']:.2f}"
    ensemble = ((f"{100 * r['ensemble_test_accuracy']:.2f}"
                 if "ensemble_test_accuracy" in r else "-",) if seeds else ())
    rows.append((labels.get(name, name), r["model"], str(r["steps"]), acc) + ensemble
                + (f"{r['wall_time_s']:.0f}",))
  widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
