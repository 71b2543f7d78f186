"""Convolution and BatchNorm with backward passes that XLA:CPU runs fast.

Both compute what `lax.conv_general_dilated` and `flax.linen.BatchNorm` compute, to
float32 rounding (tests/test_layers.py pins values and gradients); only the form of
the gradient computation differs. On a 2-core CPU a CIFAR ResNet training step spends
most of its time moving activations through memory, so the changes cut memory passes.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (pass it to
`flax.linen.Conv(conv_general_dilated=...)`). The forward pass is `lax`'s. The
gradients are the same mathematical quantities, computed in a different form:

- Kernel gradient. XLA computes it as a convolution whose input is the layer input
  with the batch as its minor (fastest) dimension, `(C, H, W, B)`, and inserts that
  transpose. Left alone, XLA fuses the ops that produced the input (BatchNorm, ReLU,
  the residual add) into the transpose, so every element is recomputed while the
  input is read with a stride of C elements: each cache line is fetched once per
  channel. That fused transpose was 40% of a CIFAR ResNet training step on a 2-core
  CPU. Here the transpose reads the stored input (a `lax.cond` is a fusion boundary
  for XLA), which makes it a plain memory-bound copy.
- Input gradient of a strided convolution. XLA computes it as a convolution over the
  output gradient dilated with zeros (3 of every 4 inputs zero for stride 2). Here it
  is one stride-1 convolution producing the s*s phases of the input gradient as
  channels, then a depth-to-space reshuffle: about 2x fewer multiply-adds, and no
  work on zeros.

`BatchNorm` is `flax.linen.BatchNorm` (same parameters, statistics, momentum update
and fast-variance formula) whose training-mode backward pass is written out: one
reduction pass and one elementwise pass over the layer input. Differentiating Flax's
version makes XLA store `x - mean` as an extra activation-sized buffer and read it in
more passes.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding, precision, dimension_numbers=_NHWC):
  return lax.conv_general_dilated(x, w, strides, padding, precision=precision,
                                  dimension_numbers=dimension_numbers)


def _batch_minor(x: jax.Array, token: jax.Array) -> jax.Array:
  """`(B, H, W, C) -> (C, H, W, B)`, read from `x`'s buffer.

  Both branches are the same transpose, so the result never depends on `token` (any
  runtime scalar). The conditional keeps XLA from fusing `x`'s producers into the
  transpose, where they would be recomputed with strided reads.
  """
  transpose = lambda v: jnp.transpose(v, (3, 1, 2, 0))  # noqa: E731
  return lax.cond(token == token, transpose, transpose, x)


def _kernel_grad(x, w_shape, g, strides, padding, precision):
  """dL/dw `(kh, kw, C, O)` from the input `x` `(B, H, W, C)` and `g` `(B, Ho, Wo, O)`."""
  x_t = _batch_minor(x, g[0, 0, 0, 0])
  # The forward convolution stated on the transposed input; `lax`'s kernel gradient of
  # it is XLA's canonical layout already, so no further transpose of `x` is inserted.
  transpose = jax.linear_transpose(
      lambda w: _conv(x_t, w, strides, padding, precision, ("CHWN", "HWIO", "NHWC")),
      jax.ShapeDtypeStruct(w_shape, g.dtype))
  return transpose(g)[0]


def _strided_input_grad(g, w, x_shape, strides, padding, precision):
  """dL/dx of a strided convolution without convolving zeros.

  With x_pad the padded input, output position i reads x_pad rows s*i + ky. Input row
  p = s*u + a receives g[u - m] * w[a + s*m] for each m: per phase a, a stride-1
  convolution of g with the sub-kernel w[a::s] (flipped). All s*s phases come out of
  one convolution as channels `(a, e, C)`, then interleave back (depth to space).
  """
  b, h, w_in, c = x_shape
  kh, kw, _, o = w.shape
  (sh, sw), ((pt, _), (pl, _)) = strides, padding
  _, ho, wo, _ = g.shape
  mh, mw = -(-kh // sh), -(-kw // sw)  # Taps per phase (ceil).
  uh, uw = -(-(pt + h) // sh), -(-(pl + w_in) // sw)  # Phase rows/cols covering x.
  # Sub-kernels, zero-padded to (mh, mw) taps, flipped, phases stacked on the output
  # channels: kernel[m', n', o, (a, e, c)] = w[a + s*(mh-1-m'), e + s*(mw-1-n'), c, o].
  wp = jnp.pad(w, ((0, mh * sh - kh), (0, mw * sw - kw), (0, 0), (0, 0)))
  wp = wp.reshape(mh, sh, mw, sw, c, o)[::-1, :, ::-1]
  kernel = wp.transpose(0, 2, 5, 1, 3, 4).reshape(mh, mw, o, sh * sw * c)
  pad_h = (mh - 1, max(uh - ho, 0))
  pad_w = (mw - 1, max(uw - wo, 0))
  z = _conv(g, kernel.astype(g.dtype), (1, 1), (pad_h, pad_w), precision)
  z = z[:, :uh, :uw]
  dx_pad = z.reshape(b, uh, uw, sh, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, uh * sh, uw * sw, c)
  return dx_pad[:, pt:pt + h, pl:pl + w_in, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision)


def _conv2d_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _conv2d_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  if strides == (1, 1):
    dx = jax.linear_transpose(lambda x: _conv(x, w, strides, padding, precision),
                              jax.ShapeDtypeStruct(x.shape, g.dtype))(g)[0]
  else:
    dx = _strided_input_grad(g, w, x.shape, strides, padding, precision)
  dw = _kernel_grad(x, w.shape, g, strides, padding, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the faster backward pass for plain 2-D NHWC
  convolutions (HWIO kernel, no dilation, no groups) on CPU; anything else, and other
  backends (whose convolution gradients have no such problem), go to `lax`."""
  plain = (jax.default_backend() == "cpu" and lhs.ndim == 4
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, precision=precision,
                                    dimension_numbers=_NHWC)
  return _conv2d(lhs, rhs, strides, padding, precision)


# ---- BatchNorm -------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """Training-mode BatchNorm over all axes but the last, as `flax.linen.BatchNorm`.

  Args:
    x: `(..., C)` activations.
    scale, bias: `(C,)` float32.
    epsilon: added to the variance.

  Returns:
    `(y, mean, var)`: `y` float32 like `x`; the batch mean and (biased, fast) variance,
    `(C,)` float32.
  """
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  # Flax's use_fast_variance: E[x^2] - E[x]^2 from one fused pass over x.
  mean, mean2 = xf.mean(axes), jnp.square(xf).mean(axes)
  var = jnp.maximum(0.0, mean2 - jnp.square(mean))
  rstd = lax.rsqrt(var + epsilon)
  y = (xf - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  gy, gmean, gvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  centered = x.astype(jnp.float32) - mean
  xhat = centered * rstd
  gy = gy.astype(jnp.float32)
  dbias = gy.sum(axes)
  dscale = (gy * xhat).sum(axes)
  dx = (scale * rstd) * (gy - (dbias + xhat * dscale) / n)
  dx = dx + (gmean + 2.0 * gvar * centered) / n  # Through the returned statistics.
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_forward, _bn_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (same variables: params `scale`, `bias`;
  batch_stats `mean`, `var`), with `batch_norm_train`'s backward pass.

  Attributes:
    use_running_average: inference mode (running statistics) instead of batch ones.
    momentum: running statistics decay: `ra = momentum * ra + (1 - momentum) * batch`.
    epsilon: added to the variance.
    dtype: output dtype (statistics and parameters stay float32).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype or x.dtype)
