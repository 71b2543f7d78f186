#!/usr/bin/env python3
"""The PyTorch peer's three steps, served step by step to `fsp_jax.bench --compare`.

Models and FSP loss are imported from `torch_reference.py` (the peer, unmodified);
`main_step`, `fsp_step` and `teacher_step` below are its step closures, line for
line. The worker reads one JSON command per line on stdin, `{"step": "main", "n": 5}`,
runs that step n times, and answers `{"times": [seconds, ...]}`. Keeping it alive lets
the caller alternate JAX and PyTorch every few steps, so both see the same load.

Run: torch_worker.py [--teacher_depth 26] [--student_depth 8] [--batch_size 128]
                     [--channels_last] [--reference torch_reference.py]
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def load_reference(path):
  spec = importlib.util.spec_from_file_location("torch_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_steps(a, ref):
  """The peer's setup and step closures (torch_reference.main), unchanged."""
  torch.manual_seed(0)
  teacher = ref.CifarResNet(a.teacher_depth).eval()
  student = ref.CifarResNet(a.student_depth).train()
  x = torch.randn(a.batch_size, 3, 32, 32)
  y = torch.randint(0, 10, (a.batch_size,))
  if a.channels_last:
    teacher = teacher.to(memory_format=torch.channels_last)
    student = student.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
  for prm in teacher.parameters():
    prm.requires_grad_(False)
  opt_s = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
  teacher_train = ref.CifarResNet(a.teacher_depth).train()
  opt_t = torch.optim.SGD(teacher_train.parameters(), lr=1e-3, momentum=0.9,
                          weight_decay=1e-4)

  def main_step():
    opt_s.zero_grad(set_to_none=True)
    logits, _ = student(x)
    F.cross_entropy(logits, y).backward()
    opt_s.step()

  def fsp_step():
    opt_s.zero_grad(set_to_none=True)
    with torch.no_grad():
      _, tf = teacher(x)
    _, sf = student(x)
    ref.fsp_loss(tf, sf).backward()
    opt_s.step()

  def teacher_step():
    opt_t.zero_grad(set_to_none=True)
    logits, _ = teacher_train(x)
    F.cross_entropy(logits, y).backward()
    opt_t.step()

  return {"main": main_step, "fsp": fsp_step, "teacher": teacher_step}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--teacher_depth", type=int, default=26)
  p.add_argument("--student_depth", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--channels_last", action="store_true")
  p.add_argument("--reference", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "torch_reference.py"))
  a = p.parse_args()
  steps = build_steps(a, load_reference(a.reference))
  print(json.dumps({"ready": True, "framework": "torch " + torch.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    times = []
    for _ in range(cmd["n"]):
      t0 = time.perf_counter()
      steps[cmd["step"]]()
      times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}), flush=True)


if __name__ == "__main__":
  main()
