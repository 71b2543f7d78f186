"""The pure distillation losses, as RepDistiller (DKD: mdistiller) computes them.

| function                 | matches                      | paper                      |
|--------------------------|------------------------------|----------------------------|
| `kd_loss`                | softened class probabilities | Hinton et al. 2015         |
| `at_loss`                | attention maps               | Zagoruyko & Komodakis 2017 |
| `sp_loss`                | batch similarity matrices    | Tung & Mori 2019           |
| `pkt_loss`               | cosine-similarity densities  | Passalis & Tefas 2018      |
| `rkd_loss`               | distances and angles         | Park et al. 2019           |
| `nst_loss`               | neuron selectivity (MMD)     | Huang & Wang 2017          |
| `dkd_loss`               | target, non-target class KL  | Zhao et al. 2022           |
| `fsp_matrix`, `fsp_loss` | FSP matrices (`fsp_jax.fsp`) | Yim et al. 2017            |

Each follows RepDistiller's `distiller_zoo/<NAME>.py` (DKD: mdistiller's
`mdistiller/distillers/DKD.py`); the docstrings give the formula and the file.

Every loss is a pure function of arrays returning the scalar batch loss, without the
method's weight (RKD's distance and angle weights are part of its loss, as in
RepDistiller): `jax.jit`, `jax.grad` and `jax.vmap` apply directly, and gradients are
finite everywhere, all-zero inputs included. Feature maps are channels-last
`(B, H, W, C)`, embeddings `(B, D)`, logits `(B, K)`; everything is computed in
float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from fsp_jax import fsp as fsp_lib
from fsp_jax.fsp import fsp_loss, fsp_matrix
from fsp_jax.validation import ConfigError

__all__ = ["kd_loss", "at_loss", "sp_loss", "pkt_loss", "rkd_loss", "nst_loss",
           "dkd_loss", "fsp_matrix", "fsp_loss"]

_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _norm(x: jax.Array, axis: int = -1, eps: float = _NORM_EPS) -> jax.Array:
  """`max(||x||_2, eps)` along `axis` (keepdims), as `sqrt(max(sum x**2, eps**2))`:
  the same value, and a finite gradient where `x` is 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _normalize(x: jax.Array, axis: int = -1, eps: float = _NORM_EPS) -> jax.Array:
  """`torch.nn.functional.normalize`: `x / max(||x||_2, eps)` along `axis`."""
  return x / _norm(x, axis, eps)


def _xlogx(p: jax.Array) -> jax.Array:
  """`p * log(p)` with `0 * log 0 = 0` (torch's xlogy), in value and gradient."""
  positive = p > 0
  return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def _kl_sum(log_q: jax.Array, p: jax.Array) -> jax.Array:
  """`F.kl_div(log_q, p, reduction='sum')`: `sum p * (log p - log_q)`, 0 where p = 0."""
  return jnp.sum(_xlogx(p) - jnp.where(p > 0, p * log_q, 0.0))


def _smooth_l1(x: jax.Array, y: jax.Array, beta: float = 1.0) -> jax.Array:
  """`F.smooth_l1_loss(x, y)` (beta 1, mean): `0.5 d**2 / beta` where `|d| < beta`,
  else `|d| - 0.5 beta`."""
  d = jnp.abs(x - y)
  return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))


def match_spatial(f_s: jax.Array, f_t: jax.Array, what: str
                  ) -> Tuple[jax.Array, jax.Array]:
  """Pools the larger of two maps `(B, H, W, C)` down to the smaller's `H, W` by block
  means (`fsp.match_spatial` with 'avg'; RepDistiller: `adaptive_avg_pool2d`). Raises
  ConfigError (one line, naming `what` and both shapes) where they cannot be paired."""
  try:
    return fsp_lib.match_spatial(f_s, f_t, "avg")
  except ValueError:
    raise ConfigError(
        f"{what}: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} "
        "cannot be pooled to one size: they must be channels-last maps (B, H, W, C) "
        "of one batch, the larger an integer multiple of the smaller in height and "
        "width.") from None


def _pdist(e: jax.Array, eps: float = 1e-12) -> jax.Array:
  """RepDistiller `RKDLoss.pdist`: `sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=eps))`
  `(B, B)`, diagonal 0."""
  sq = jnp.sum(e * e, axis=1)
  prod = jnp.matmul(e, e.T, precision=_HIGHEST)
  d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * prod, eps))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _positive_mean(x: jax.Array) -> jax.Array:
  """Mean of the entries > 0 (`x[x > 0].mean()`); 0 where there are none."""
  positive = x > 0
  return jnp.sum(jnp.where(positive, x, 0.0)) / jnp.maximum(jnp.sum(positive), 1)


def _by_positive_mean(d: jax.Array) -> jax.Array:
  """`d / d[d > 0].mean()`; `d` unchanged (all 0) where no entry is > 0 (B = 1, where
  RepDistiller gives NaN)."""
  mean = _positive_mean(d)
  return d / jnp.where(mean > 0, mean, 1.0)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float = 4.0) -> jax.Array:
  """Knowledge distillation (Hinton et al. 2015), RepDistiller `distiller_zoo/KD.py`
  (`DistillKL`).

  `p_s = log_softmax(y_s / T)`, `p_t = softmax(y_t / T)`;
  `loss = kl_div(p_s, p_t, sum) * T**2 / B = sum p_t (log p_t - p_s) * T**2 / B`.

  Args:
    student_logits, teacher_logits: `(B, K)`.
    temperature: T.

  Returns:
    scalar float32.
  """
  y_s, y_t = _f32(student_logits), _f32(teacher_logits)
  log_p_s = jax.nn.log_softmax(y_s / temperature, axis=-1)
  p_t = jax.nn.softmax(y_t / temperature, axis=-1)
  return _kl_sum(log_p_s, p_t) * temperature ** 2 / y_s.shape[0]


def _attention(f: jax.Array, p) -> jax.Array:
  """`F.normalize(f.pow(p).mean(channels).view(B, -1))`: `(B, H * W)`."""
  return _normalize(jnp.mean(f ** p, axis=-1).reshape(f.shape[0], -1), axis=1)


def at_loss(student_map: jax.Array, teacher_map: jax.Array, p=2) -> jax.Array:
  """Attention transfer (Zagoruyko & Komodakis 2017) for one pair of maps,
  RepDistiller `distiller_zoo/AT.py` (`Attention.at_loss`).

  `at(f) = normalize(mean_c f**p, flattened over H*W)` (x / max(||x||_2, 1e-12));
  `loss = mean((at(f_s) - at(f_t))**2)` over batch and positions. The larger map is
  average-pooled to the smaller's spatial size first.

  Args:
    student_map: `(B, Hs, Ws, Cs)`.
    teacher_map: `(B, Ht, Wt, Ct)`; the channel counts may differ, the spatial sizes
      must be integer multiples of each other (in the same direction for H and W).
    p: the power of the activations.

  Returns:
    scalar float32. Raises ConfigError (one line) where the sizes cannot be pooled.
  """
  f_s, f_t = match_spatial(_f32(student_map), _f32(teacher_map), "at_loss")
  return jnp.mean((_attention(f_s, p) - _attention(f_t, p)) ** 2)


def _similarity(f: jax.Array) -> jax.Array:
  """`F.normalize(f f^T)` for `f` the map flattened to `(B, -1)`: `(B, B)`."""
  f = f.reshape(f.shape[0], -1)
  return _normalize(jnp.matmul(f, f.T, precision=_HIGHEST), axis=1)


def sp_loss(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
  """Similarity-preserving KD (Tung & Mori 2019), RepDistiller `distiller_zoo/SP.py`
  (`Similarity.similarity_loss`).

  `f = map.reshape(B, -1)`, `G = f f^T` with each row L2-normalised
  (`F.normalize`, eps 1e-12); `loss = sum((G_t - G_s)**2) / B**2`.

  Args:
    student_map, teacher_map: `(B, ...)` of any sizes; only B must agree.

  Returns:
    scalar float32.
  """
  f_s, f_t = _f32(student_map), _f32(teacher_map)
  if f_s.shape[0] != f_t.shape[0]:
    raise ConfigError(f"sp_loss needs maps of one batch; got student "
                      f"{tuple(f_s.shape)} and teacher {tuple(f_t.shape)}.")
  b = f_s.shape[0]
  return jnp.sum((_similarity(f_t) - _similarity(f_s)) ** 2) / (b * b)


def _pkt_probabilities(x: jax.Array, eps: float) -> jax.Array:
  """Rows / (||row|| + eps) (NaN -> 0), `S = X X^T`, `(S + 1) / 2`, rows summing to 1."""
  sq = jnp.sum(x * x, axis=1, keepdims=True)
  # ||x|| exactly, with a finite gradient at x = 0.
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  x = x / (norm + eps)
  x = jnp.where(jnp.isnan(x), 0.0, x)
  s = (jnp.matmul(x, x.T, precision=_HIGHEST) + 1.0) / 2.0
  return s / jnp.sum(s, axis=1, keepdims=True)


def pkt_loss(student_embedding: jax.Array, teacher_embedding: jax.Array,
             eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer (Passalis & Tefas 2018), RepDistiller
  `distiller_zoo/PKT.py` (`PKT.cosine_similarity_loss`).

  Each row divided by (its L2 norm + eps), NaNs set to 0; `S = X X^T`, `(S + 1) / 2`,
  rows normalised to sum 1 (student: `S`, teacher: `T`);
  `loss = mean(T * log((T + eps) / (S + eps)))` over the `B * B` entries.

  Args:
    student_embedding: `(B, Ds)`; teacher_embedding: `(B, Dt)` (widths may differ;
      trailing dims beyond the second are flattened).
    eps: the norm and log offset.

  Returns:
    scalar float32 (about 0, not exactly, where student equals teacher: eps).
  """
  x_s = _f32(student_embedding)
  x_t = _f32(teacher_embedding)
  s = _pkt_probabilities(x_s.reshape(x_s.shape[0], -1), eps)
  t = _pkt_probabilities(x_t.reshape(x_t.shape[0], -1), eps)
  return jnp.mean(t * jnp.log((t + eps) / (s + eps)))


def _angles(e: jax.Array) -> jax.Array:
  """`angle[i, j, k] = <n(e_j - e_i), n(e_k - e_i)>` flattened, n = F.normalize."""
  diff = _normalize(e[None, :, :] - e[:, None, :], axis=-1)
  return jnp.einsum("ijd,ikd->ijk", diff, diff, precision=_HIGHEST).reshape(-1)


def rkd_loss(student_embedding: jax.Array, teacher_embedding: jax.Array,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> jax.Array:
  """Relational KD (Park et al. 2019), RepDistiller `distiller_zoo/RKD.py` (`RKDLoss`,
  `w_d=25, w_a=50`).

  Distance: `pdist(e)` = `sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=1e-12))`, diagonal 0,
  divided by the mean of its entries > 0; `loss_d = smooth_l1(d_s, d_t)` (beta 1,
  mean). Angle: `n_ij = normalize(e_j - e_i)`, `angle_ijk = <n_ij, n_ik>`;
  `loss_a = smooth_l1(angle_s, angle_t)` (mean over B**3). The teacher's side carries
  no gradient (`stop_gradient`; RepDistiller: `torch.no_grad()`).

  `loss = distance_weight * loss_d + angle_weight * loss_a`.

  Args:
    student_embedding: `(B, Ds)`; teacher_embedding: `(B, Dt)` (widths may differ;
      trailing dims beyond the second are flattened, as RepDistiller's `view(B, -1)`).

  Returns:
    scalar float32.
  """
  student = _f32(student_embedding)
  teacher = jax.lax.stop_gradient(_f32(teacher_embedding))
  student = student.reshape(student.shape[0], -1)
  teacher = teacher.reshape(teacher.shape[0], -1)
  loss_d = _smooth_l1(_by_positive_mean(_pdist(student)),
                      _by_positive_mean(_pdist(teacher)))
  loss_a = _smooth_l1(_angles(student), _angles(teacher))
  return distance_weight * loss_d + angle_weight * loss_a


@jax.custom_vjp
def _position_gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """`(B, N, Ca)`, `(B, N, Cb)` -> `(B, Ca, Cb)`: `sum_k a[n, k, i] b[n, k, j]`.

  Its gradient is written as one product per operand whose result is already laid out
  as that operand, `(B, N, C)`; differentiating the einsum instead computes each as
  `(B, C, N)` and transposes the whole map back (a third of NST's term, measured)."""
  return jnp.einsum("nki,nkj->nij", a, b, precision=_HIGHEST)


def _position_gram_fwd(a, b):
  return _position_gram(a, b), (a, b)


def _position_gram_bwd(residuals, g):
  a, b = residuals
  return (jnp.einsum("nkj,nij->nki", b, g, precision=_HIGHEST),
          jnp.einsum("nki,nij->nkj", a, g, precision=_HIGHEST))


_position_gram.defvjp(_position_gram_fwd, _position_gram_bwd)


def _poly_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
  """RepDistiller `NSTLoss.poly_kernel` with each channel's vector down a column:
  `res[n, i, j] = (sum_k a[n, k, j] b[n, k, i])**2` for `a` `(B, HW, Ca)`, `b`
  `(B, HW, Cb)`: `(B, Cb, Ca)`."""
  return _position_gram(b, a) ** 2


def _channel_vectors(f: jax.Array) -> jax.Array:
  """`(B, H, W, C)` -> `(B, H * W, C)`, each channel's vector (a column) L2-normalised
  (RepDistiller's `(B, C, H * W)` rows, left in the map's own layout)."""
  b, h, w, c = f.shape
  return _normalize(f.reshape(b, h * w, c), axis=1)


def nst_loss(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
  """Neuron selectivity transfer (Huang & Wang 2017) for one pair of maps, RepDistiller
  `distiller_zoo/NST.py` (`NSTLoss.nst_loss`, full loss).

  The larger map is average-pooled to the smaller's spatial size; `f` = the map as
  `(B, C, H*W)`, each channel's vector L2-normalised (`F.normalize` dim 2);
  `poly(a, b)[n, i, j] = (sum_k a[n, j, k] b[n, i, k])**2` (computed on the map's
  `(B, H*W, C)` layout: the same sums);
  `loss = mean(poly(f_t, f_t)) (no gradient) + mean(poly(f_s, f_s))
  - 2 mean(poly(f_s, f_t))`.

  Args:
    student_map: `(B, Hs, Ws, Cs)`; teacher_map: `(B, Ht, Wt, Ct)` (channel counts
      may differ; spatial sizes as for `at_loss`).

  Returns:
    scalar float32. Raises ConfigError (one line) where the sizes cannot be pooled.
  """
  f_s, f_t = match_spatial(_f32(student_map), _f32(teacher_map), "nst_loss")
  f_s, f_t = _channel_vectors(f_s), _channel_vectors(f_t)
  return (jax.lax.stop_gradient(jnp.mean(_poly_kernel(f_t, f_t)))
          + jnp.mean(_poly_kernel(f_s, f_s)) - 2.0 * jnp.mean(_poly_kernel(f_s, f_t)))


def _log_clamped(p: jax.Array) -> jax.Array:
  """`log(p)`, with p clamped to float32's smallest normal number (finite where p
  underflowed to 0; unchanged elsewhere)."""
  return jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
             alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> jax.Array:
  """Decoupled KD (Zhao et al. 2022), mdistiller `mdistiller/distillers/DKD.py`
  (`dkd_loss`); the method's warm-up factor is not part of it.

  `gt` = one-hot of the labels, `other = 1 - gt`, `pred = softmax(logits / T)`;
  `cat = [sum(pred * gt), sum(pred * other)]` `(B, 2)`;
  `tckd = kl_div(log cat_s, cat_t, sum) * T**2 / B`;
  `nckd = kl_div(log_softmax(y_s / T - 1000 gt), softmax(y_t / T - 1000 gt), sum)
  * T**2 / B`; `loss = alpha * tckd + beta * nckd`. kl_div takes `0 log 0 = 0`, so the
  masked entries (underflowing to 0) add 0 in value and gradient.

  Args:
    student_logits, teacher_logits: `(B, K)`.
    labels: `(B,)` integer class indices.
    alpha, beta: the weights of the target and non-target parts.
    temperature: T.

  Returns:
    scalar float32.
  """
  y_s, y_t = _f32(student_logits), _f32(teacher_logits)
  b, k = y_s.shape
  gt = jax.nn.one_hot(jnp.reshape(labels, (-1,)), k, dtype=jnp.float32)
  other = 1.0 - gt
  t2 = temperature ** 2

  def cat(pred):
    return jnp.stack([jnp.sum(pred * gt, axis=1), jnp.sum(pred * other, axis=1)], 1)

  cat_s = cat(jax.nn.softmax(y_s / temperature, axis=1))
  cat_t = cat(jax.nn.softmax(y_t / temperature, axis=1))
  tckd = _kl_sum(_log_clamped(cat_s), cat_t) * t2 / b
  p_t2 = jax.nn.softmax(y_t / temperature - 1000.0 * gt, axis=1)
  log_p_s2 = jax.nn.log_softmax(y_s / temperature - 1000.0 * gt, axis=1)
  nckd = _kl_sum(log_p_s2, p_t2) * t2 / b
  return alpha * tckd + beta * nckd
