"""Metrics of a stage: JSON lines and TensorBoard event files, written by process 0.

Each stage directory `WORKDIR/<stage>/` gets

- `metrics.jsonl`: one JSON object a line. Training records
  `{"step", "loss", "learning_rate", "images_per_s", "accuracy"}` (stage 1 has no
  accuracy), evaluation records `{"step", "test_accuracy", "test_loss"}` or
  `{"step", "test_fsp_loss"}`.
- `events.out.tfevents.*`: the same scalars for TensorBoard, so that
  `tensorboard --logdir WORKDIR` shows one run per stage (teacher, fsp, student,
  baselines) side by side. Tags: `train/loss`, `train/accuracy`,
  `train/learning_rate`, `train/images_per_s`, `test/accuracy`, `test/loss`; in
  stage 1 `train/fsp_loss` and `test/fsp_loss`, so that an FSP loss is never drawn in
  one chart with a cross-entropy.

The event files are written with the `tensorboard` package's record format and
protos; TensorFlow is not needed. A stage resumed at step `s` keeps the records of
steps `<= s` in both formats and drops the rest, so the curves have no doubled
segments after a restart. A stage resumed at its final step (killed after its last
checkpoint) also drops that step's evaluation, which the resumed run writes again.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import time
from typing import Any, Dict, List

import jax

JSONL = "metrics.jsonl"
EVENTS_PATTERN = "events.out.tfevents.*"


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


class TensorBoardWriter:
  """Appends scalar events to one event file in `log_dir`.

  Every `write` opens, appends and closes the file: nothing to flush or close, and a
  kill loses at most the record being written (the reader skips a cut record).
  """

  def __init__(self, log_dir: str, start_step: int = 0, drop_test_at_start=False):
    """Starts a new event file; keeps older files' events of steps <= start_step.

    With `drop_test_at_start`, `test/*` values at `start_step` are dropped too.
    """
    self._drop_test_at_start = drop_test_at_start
    from tensorboard.compat.proto import event_pb2  # Heavy; only where written.
    from tensorboard.summary.writer import record_writer
    self._event_pb2 = event_pb2
    self._record_writer = record_writer
    os.makedirs(log_dir, exist_ok=True)
    old_files = sorted(glob.glob(os.path.join(log_dir, EVENTS_PATTERN)))
    kept = self._events_up_to(old_files, start_step) if start_step > 0 else []
    # The name TensorBoard expects: events.out.tfevents.<time>.<host>.<pid>.
    name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}."
            f"{os.getpid()}.fsp_jax")
    self.path = os.path.join(log_dir, name)
    # The kept events reach the new file (written aside, then renamed) before the old
    # files go: a kill in between leaves copies, which the next start de-duplicates.
    header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    final_path, self.path = self.path, self.path + ".tmp"
    self._append([header.SerializeToString()] + kept)
    os.replace(self.path, final_path)
    self.path = final_path
    for path in old_files:
      if path != final_path:
        os.remove(path)

  def _events_up_to(self, paths: List[str], step: int) -> List[bytes]:
    """Serialized summary events of `paths` with step <= `step`, in file order."""
    from tensorboard.backend.event_processing import event_file_loader
    kept, seen = [], set()
    for path in paths:
      for raw in event_file_loader.RawEventFileLoader(path).Load():
        event = self._event_pb2.Event.FromString(raw)
        if not event.HasField("summary") or event.step > step or raw in seen:
          continue
        seen.add(raw)
        if self._drop_test_at_start and event.step == step:
          values = [v for v in event.summary.value if not v.tag.startswith("test/")]
          if not values:
            continue
          del event.summary.value[:]
          event.summary.value.extend(values)
          raw = event.SerializeToString()
        kept.append(raw)
    return kept

  def _append(self, serialized: List[bytes]) -> None:
    with open(self.path, "ab") as f:
      writer = self._record_writer.RecordWriter(f)
      for data in serialized:
        writer.write(data)

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    """One event at `step` holding each `tag: value` of `scalars`."""
    from tensorboard.compat.proto import summary_pb2
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in scalars.items()])
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                  summary=summary)
    self._append([event.SerializeToString()])


class MetricsWriter:
  """A stage's metrics as JSON lines and TensorBoard scalars, from process 0 only.

  A resume at `start_step` drops the records of later steps (written before the
  interruption, after the checkpoint it resumes from) from both; a resume at
  `final_step` also drops that step's evaluation (the final one, written again).
  """

  def __init__(self, stage_dir: str, start_step: int, kind: str = "classify",
               final_step: int = -1):
    """Args: stage_dir: `WORKDIR/<stage>`; start_step: the step the stage starts or
    resumes at (0 for a fresh start); kind: the stage's kind (names the loss);
    final_step: the stage's last step."""
    self.path = os.path.join(stage_dir, JSONL)
    self.kind = kind
    self.enabled = jax.process_index() == 0
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
    self.tensorboard = TensorBoardWriter(stage_dir, start_step, drop_test_at_start=at_end)

  def write(self, record: Dict[str, Any]) -> None:
    """Appends `record` (a dict with 'step' and float metrics) to both outputs."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    scalars = {tensorboard_tag(k, self.kind): v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float))}
    if scalars:
      self.tensorboard.write_scalars(record["step"], scalars)


def _is_evaluation(record: Dict[str, Any]) -> bool:
  return any(k.startswith("test_") for k in record)
