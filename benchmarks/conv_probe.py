"""Probe: where the main step's time goes, convolution by convolution, JAX vs PyTorch.

    python benchmarks/conv_probe.py [--depth 8] [--batch_size 128] [--repeats 5]

For every convolution of a CIFAR ResNet (shape, stride, and how many the network
has), times forward + both gradients of that one layer, jitted, in JAX (the
`fsp_jax.layers` convolution the models use) and in PyTorch (NCHW and channels-last,
the best kept), the two taking turns, median of `--repeats` rounds. Prints one JSON
object: per layer and summed over the network, with the share of JAX's whole main
step (`fsp_jax.bench`) that the convolutions take, and the same for the PyTorch peer's
main step (channels-last). Needs torch (`pip install torch`).
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import torch
import torch.nn.functional as F

from fsp_jax import bench, layers


def resnet_convs(depth, batch):
  """Counter of (batch, size, c_in, c_out, kernel, stride) over a CIFAR ResNet."""
  n = (depth - 2) // 6
  convs = collections.Counter({(batch, 32, 3, 16, 3, 1): 1})
  size, c_in = 32, 16
  for k, width in enumerate((16, 32, 64)):
    for j in range(n):
      stride = 2 if (k > 0 and j == 0) else 1
      convs[(batch, size, c_in, width, 3, stride)] += 1
      if stride != 1 or c_in != width:
        convs[(batch, size, c_in, width, 1, stride)] += 1
      size //= stride
      convs[(batch, size, width, width, 3, 1)] += 1
      c_in = width
  return convs


def _timed(fn, n):
  fn()
  t = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - t) / n * 1e3


def jax_layer(b, s, ci, co, k, st):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (b, s, s, ci))
  w = jax.random.normal(kw, (k, k, ci, co))
  pad = ((k // 2, k // 2),) * 2
  conv = lambda x, w: layers.conv_general_dilated(  # noqa: E731
      x, w, (st, st), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  g = jax.random.normal(kg, jax.eval_shape(conv, x, w).shape)
  step = jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](g))
  return lambda: jax.block_until_ready(step(x, w))


def torch_layer(b, s, ci, co, k, st, channels_last):
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(b, ci, s, s).to(memory_format=fmt).requires_grad_()
  w = torch.randn(co, ci, k, k).to(memory_format=fmt).requires_grad_()
  y = F.conv2d(x, w, stride=st, padding=k // 2)
  g = torch.randn_like(y)

  def run():
    x.grad = w.grad = None
    F.conv2d(x, w, stride=st, padding=k // 2).backward(g)
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  rows, total = [], collections.Counter()
  for shape, count in sorted(resnet_convs(args.depth, args.batch_size).items()):
    fns = {"jax": jax_layer(*shape),
           "torch_nchw": torch_layer(*shape, channels_last=False),
           "torch_channels_last": torch_layer(*shape, channels_last=True)}
    ms = {name: statistics.median(_timed(f, args.steps) for _ in range(args.repeats))
          for name, f in fns.items()}
    ms["torch"] = min(ms["torch_nchw"], ms["torch_channels_last"])
    b, s, ci, co, k, st = shape
    flop = 3 * 2 * b * (s // st) ** 2 * k * k * ci * co  # forward + 2 gradients
    rows.append({"layer": f"{k}x{k}/{st} {s}x{s}x{ci}->{co}", "count": count,
                 "jax_ms": round(ms["jax"], 2), "torch_ms": round(ms["torch"], 2),
                 "jax_gflops": round(flop / ms["jax"] / 1e6, 1),
                 "torch_gflops": round(flop / ms["torch"] / 1e6, 1)})
    for name in ("jax", "torch"):
      total[name] += count * ms[name]
  bench_args = bench.parse_args(["--student_depth", str(args.depth), "--only", "main",
                                 "--steps", str(args.steps)])
  main_ips = bench.run_jax(bench_args)["main_images_per_s"]
  step_ms = args.batch_size / main_ips * 1e3
  peer = subprocess.run(
      [sys.executable, bench.TORCH_REFERENCE, "--channels_last", "--student_depth",
       str(args.depth), "--batch_size", str(args.batch_size), "--steps",
       str(args.steps)], check=True, capture_output=True, text=True,
      env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
  torch_ms = args.batch_size / json.loads(peer.stdout.splitlines()[-1])[
      "main_images_per_s"] * 1e3
  print(json.dumps({
      "layers": rows,
      "conv_ms_jax": round(total["jax"], 1), "conv_ms_torch": round(total["torch"], 1),
      "jax_main_step_ms": round(step_ms, 1),
      "conv_share_of_jax_main_step": round(total["jax"] / step_ms, 2),
      "jax_main_step_ms_without_convs": round(step_ms - total["jax"], 1),
      "torch_main_step_ms": round(torch_ms, 1),
      "torch_main_step_ms_without_convs": round(torch_ms - total["torch"], 1)},
      indent=1))


if __name__ == "__main__":
  main()
