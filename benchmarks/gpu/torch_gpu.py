#!/usr/bin/env python3
"""The PyTorch peer on a GPU, given its best: channels-last, bfloat16 autocast (AMP),
torch.compile. Same models and steps as benchmarks/torch_reference.py (imported from
it); times are taken with CUDA synchronisation. Prints one JSON object per setting.

    python benchmarks/gpu/torch_gpu.py --steps 50 --warmup 10
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_reference import CifarResNet, fsp_loss  # noqa: E402


def bench(a, amp: bool, compile_: bool) -> dict:
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  cl = torch.channels_last
  teacher = CifarResNet(a.teacher_depth).to(device, memory_format=cl).eval()
  student = CifarResNet(a.student_depth).to(device, memory_format=cl).train()
  teacher_train = CifarResNet(a.teacher_depth).to(device, memory_format=cl).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  x = torch.randn(a.batch_size, 3, 32, 32, device=device).to(memory_format=cl)
  y = torch.randint(0, 10, (a.batch_size,), device=device)
  opt_s = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
  opt_t = torch.optim.SGD(teacher_train.parameters(), lr=1e-3, momentum=0.9,
                          weight_decay=1e-4)
  ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else (
      lambda: torch.autocast(device, enabled=False))

  def main_step():
    opt_s.zero_grad(set_to_none=True)
    with ctx():
      logits, _ = student(x)
      loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt_s.step()

  def fsp_step():
    opt_s.zero_grad(set_to_none=True)
    with ctx():
      with torch.no_grad():
        _, tf = teacher(x)
      _, sf = student(x)
      loss = fsp_loss([t.float() for t in tf], [s.float() for s in sf])
    loss.backward()
    opt_s.step()

  def teacher_step():
    opt_t.zero_grad(set_to_none=True)
    with ctx():
      logits, _ = teacher_train(x)
      loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt_t.step()

  steps = {"main": main_step, "fsp": fsp_step, "teacher": teacher_step}
  if compile_:
    steps = {k: torch.compile(v) for k, v in steps.items()}
  out = {"framework": "torch " + torch.__version__, "device": device, "amp_bf16": amp,
         "compile": compile_, "channels_last": True, "batch_size": a.batch_size}
  for name, step in steps.items():
    for _ in range(a.warmup):
      step()
    torch.cuda.synchronize() if device == "cuda" else None
    ts = []
    for _ in range(a.steps):
      t0 = time.perf_counter()
      step()
      torch.cuda.synchronize() if device == "cuda" else None
      ts.append(time.perf_counter() - t0)
    out[f"{name}_images_per_s"] = round(a.batch_size / statistics.median(ts), 1)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--teacher_depth", type=int, default=26)
  p.add_argument("--student_depth", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--no_compile", action="store_true", help="skip the compiled settings")
  a = p.parse_args()
  for amp in (False, True):
    for compile_ in ((False,) if a.no_compile else (False, True)):
      try:
        print(json.dumps(bench(a, amp, compile_)), flush=True)
      except Exception as e:  # A setting the machine cannot run is reported, not fatal.
        print(json.dumps({"amp_bf16": amp, "compile": compile_,
                          "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)


if __name__ == "__main__":
  main()
