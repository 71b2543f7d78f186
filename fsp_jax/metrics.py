"""Metrics of a stage, progress on the terminal, and the results of a run.

Each stage directory `WORKDIR/<stage>/` gets, from process 0:

- `metrics.jsonl`: one JSON object a line. Training records
  `{"step", "loss", "learning_rate", "images_per_s", "accuracy"}` (stage 1 has no
  accuracy), evaluation records `{"step", "test_accuracy", "test_loss"}` or
  `{"step", "test_fsp_loss"}`.
- `events.out.tfevents.*` (tensorboardX, no TensorFlow needed): the same scalars, so
  that `tensorboard --logdir WORKDIR` shows one run per stage side by side. Tags:
  `train/loss`, `train/accuracy`, `train/learning_rate`, `train/images_per_s`,
  `test/accuracy`, `test/loss`; in stage 1 `train/fsp_loss` and `test/fsp_loss`, so
  that an FSP loss is never drawn in one chart with a cross-entropy.

A stage resumed at step `s` keeps the records of steps `<= s` and drops the rest: the
JSON lines are cut back, and the new event file starts with a purge at step `s + 1`,
which TensorBoard applies to the older files. The curves have no doubled segments
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

from fsp_jax import checkpoints

JSONL = "metrics.jsonl"
RESULTS = "results.json"
log = logging.getLogger("fsp_jax")
_LABELS = {"fsp": "FSP", "hint": "FitNet hints", "kd": "KD"}


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
    kind: the stage kind, 'classify' or a stage 1's distiller ('fsp', 'hint'), whose
      training loss is that distiller's loss ('train/fsp_loss').
  """
  if key.startswith("test_"):
    return "test/" + key[len("test_"):]
  if key == "loss" and kind != "classify":
    return f"train/{kind}_loss"
  return "train/" + key


class MetricsWriter:
  """A stage's metrics as JSON lines and TensorBoard scalars, from process 0 only.

  A resume at `start_step` drops the records of later steps (written before the
  interruption, after the checkpoint it resumes from); a resume at `final_step` also
  drops that step's evaluation from the JSON lines (the final one, written again).
  """

  def __init__(self, stage_dir: str, start_step: int, kind: str = "classify",
               final_step: int = -1):
    """Args: stage_dir: `WORKDIR/<stage>`; start_step: the step the stage starts or
    resumes at (0 for a fresh start); kind: the stage's kind (names the loss);
    final_step: the stage's last step."""
    self.path = os.path.join(stage_dir, JSONL)
    self.kind = kind
    self.enabled = jax.process_index() == 0
    self.tensorboard = None
    if not self.enabled:
      return
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
    from tensorboardX import SummaryWriter  # Only where metrics are written.
    self.tensorboard = SummaryWriter(stage_dir, purge_step=start_step + 1 if start_step
                                     else None)

  def write(self, record: Dict[str, Any]) -> None:
    """Appends `record` (a dict with 'step' and float metrics) to both outputs."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.tensorboard.add_scalar(tensorboard_tag(key, self.kind), value,
                                    record["step"])
    self.tensorboard.flush()  # Records are rare (log steps): a kill loses none.

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def _is_evaluation(record: Dict[str, Any]) -> bool:
  return any(k.startswith("test_") for k in record)


class Progress:
  """A stage's progress bar (tqdm: steps, ETA, loss, images/s) on process 0."""

  def __init__(self, stage: str, start: int, total: int, batch_size: int):
    from tqdm.auto import tqdm
    self.batch_size = batch_size
    self._t, self._step = time.time(), start
    quiet = jax.process_index() != 0 or not log.isEnabledFor(logging.INFO)
    self.bar = tqdm(total=total, initial=start, desc=f"[{stage}]", unit="step",
                    file=sys.stderr, disable=quiet, dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)

  def update(self, step: int, loss: float) -> float:
    """Moves the bar to `step`; returns the images/s since the last update."""
    now = time.time()
    images_per_s = (step - self._step) * self.batch_size / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    self.bar.set_postfix_str(f"loss {loss:.4g}, {images_per_s:.0f} img/s",
                             refresh=False)
    self.bar.update(step - self.bar.n)
    return images_per_s

  def close(self) -> None:
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
    raise ValueError(f"{path} is not valid JSON ({e}); delete it: finished stages are "
                     "then only evaluated again from their final checkpoints.") from None


def write_results(workdir: str, results: Dict[str, Any]) -> None:
  """Replaces `WORKDIR/results.json` atomically."""
  checkpoints.write_json_atomic(os.path.join(workdir, RESULTS), results)


def summary(result: Dict[str, Any]) -> str:
  """One stage's result in words, e.g. 'test accuracy 97.21% after 150 steps, 5 s'."""
  if "test_accuracy" in result:
    return (f"test accuracy {100 * result['test_accuracy']:.2f}% after {result['steps']} "
            f"steps, {result['wall_time_s']:.0f} s")
  key = next((k for k in result if k.startswith("test_") and k.endswith("_loss")),
             "test_loss")
  name = _LABELS.get(key[len("test_"):-len("_loss")], key)
  return (f"test {name} loss {result.get(key, float('nan')):.4g} after "
          f"{result['steps']} steps, {result['wall_time_s']:.0f} s")


def results_table(results: Dict[str, Any]) -> str:
  """A small text table: each classification stage's final test accuracy."""
  labels = {"teacher": "teacher", "teacher_short": "teacher, student's schedule",
            "scratch": "student from scratch", "student": "FSP student (stage 2)",
            "fitnet": "FitNet student (stage 2, KD)", "kd": "student with Hinton KD"}
  rows = [("run", "model", "steps", "test acc %", "time s")]
  for name, r in results.items():
    if "test_accuracy" not in r:
      continue
    rows.append((labels.get(name, name), r["model"], str(r["steps"]),
                 f"{100 * r['test_accuracy']:.2f}", f"{r['wall_time_s']:.0f}"))
  widths = [max(len(row[k]) for row in rows) for k in range(5)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
