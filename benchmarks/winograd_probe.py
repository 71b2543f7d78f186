"""Probe: Winograd F(2x2, 3x3) written as JAX ops against `lax` convolutions on CPU.

    python benchmarks/winograd_probe.py [B,H,W,C,O]

Times forward + backward (input and kernel gradients, by autodiff) of one 3x3
stride-1 layer for the CIFAR ResNet widths, and prints the largest relative error of
the Winograd output and gradients against `lax`. The README's performance section
records the result (slower: the transforms cost more memory traffic than the fewer
multiplies save); kept so that the claim can be re-measured on other machines.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fsp_jax import layers

# F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G w G^T) * (B^T d B)] A per 4x4 tile.
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)


def _bt(t):
  """B^T applied to the first axis of a length-4 list of arrays."""
  return [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]


def _at(t):
  """A^T applied to the first axis of a length-4 list of arrays."""
  return [t[0] + t[1] + t[2], t[1] - t[2] - t[3]]


def winograd_conv(x, w):
  """3x3, stride 1, padding 1. x `(B, H, W, C)` (H, W even), w `(3, 3, C, O)`."""
  b, h, wd, c = x.shape
  o = w.shape[-1]
  th, tw = h // 2, wd // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  v = []
  for rows in _bt([xp[:, a:a + 2 * th:2] for a in range(4)]):
    v += _bt([rows[:, :, a:a + 2 * tw:2] for a in range(4)])
  v = jnp.stack(v).reshape(16, b * th * tw, c)
  u = jnp.einsum("ik,klco,jl->ijco", _G, w, _G).reshape(16, c, o)
  m = jnp.einsum("pnc,pco->pno", v, u).reshape(4, 4, b, th, tw, o)
  y = [jnp.stack(_at(list(r)), 3) for r in _at(list(m))]  # (b, th, tw, 2, o) each
  return jnp.stack(y, 2).reshape(b, h, wd, o)


def _lax(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _layers(x, w):
  return layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ms(f, x, w, g, n=10):
  step = jax.jit(lambda x, w: jax.vjp(f, x, w)[1](g))
  jax.block_until_ready(step(x, w))
  t = time.perf_counter()
  for _ in range(n):
    out = step(x, w)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n * 1e3


def main(argv):
  shapes = ([tuple(map(int, argv[1].split(",")))] if len(argv) > 1 else
            [(128, 32, 32, 16, 16), (128, 16, 16, 32, 32), (128, 8, 8, 64, 64)])
  for b, h, wd, c, o in shapes:
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (b, h, wd, c))
    w = jax.random.normal(k[1], (3, 3, c, o)) * 0.1
    g = jax.random.normal(k[2], (b, h, wd, o))
    ref = (_lax(x, w), *jax.vjp(_lax, x, w)[1](g))
    new = (winograd_conv(x, w), *jax.vjp(winograd_conv, x, w)[1](g))
    err = max(float(jnp.abs(a - n).max() / jnp.abs(a).max()) for a, n in zip(ref, new))
    print(f"{(b, h, wd, c, o)}: max rel. error {err:.1e}; forward + backward "
          f"lax {_ms(_lax, x, w, g):.1f} ms, layers {_ms(_layers, x, w, g):.1f} ms, "
          f"winograd {_ms(winograd_conv, x, w, g):.1f} ms", flush=True)


if __name__ == "__main__":
  main(sys.argv)
