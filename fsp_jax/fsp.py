"""FSP matrices and the FSP loss (Yim et al., CVPR 2017, Eq. 1 and Eq. 2).

Everything here is a pure function of arrays: `jax.jit`, `jax.grad` and `jax.vmap`
apply directly. Feature maps are channels-last, `(B, H, W, C)`; transformer token maps
`(B, N, C)` are accepted too (`tokens_to_grid` drops class tokens and lays tokens out
as an `(h, w)` grid).
"""
from __future__ import annotations

import functools
import numbers
from typing import Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

POOLING = ("max", "avg")
FspPair = Tuple  # (name, name) or (index, index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(f: jax.Array, window: Tuple[int, int]) -> jax.Array:
  """Non-overlapping max pooling of `f` `(B, H, W, C)` with windows that tile it.

  Forward: `lax.reduce_window`. Backward: elementwise, a window's gradient goes to its
  maxima (shared equally between ties). `reduce_window`'s own gradient is a
  select-and-scatter, which XLA:CPU runs as a scatter with activation-sized index
  arrays: a third of an FSP step's cost on a CPU. Either gradient is a subgradient;
  for post-ReLU features the only common ties are zeros, which get no gradient through
  the ReLU anyway.
  """
  dims = (1,) + tuple(window) + (1,)
  return jax.lax.reduce_window(f, -jnp.inf, jax.lax.max, dims, dims, "VALID")


def _max_pool_fwd(f, window):
  pooled = _max_pool(f, window)
  return pooled, (f, pooled)


def _max_pool_bwd(window, residuals, g):
  f, pooled = residuals
  b, h, w, c = f.shape
  (wh, ww), (ph, pw) = window, pooled.shape[1:3]
  windows = f.reshape(b, ph, wh, pw, ww, c)
  is_max = windows == pooled[:, :, None, :, None, :]
  count = jnp.sum(is_max, axis=(2, 4), keepdims=True)
  grad = jnp.where(is_max, (g[:, :, None, :, None, :] / count).astype(f.dtype), 0)
  return (grad.reshape(b, h, w, c),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _pool_to(f: jax.Array, height: int, width: int, pool: str) -> jax.Array:
  """Pools `f` `(B, H, W, C)` down to `(B, height, width, C)` with a window H/height."""
  b, h, w, c = f.shape
  if pool == "max":
    return _max_pool(f, (h // height, w // width))
  return jnp.mean(f.reshape(b, height, h // height, width, w // width, c), axis=(2, 4))


def match_spatial(f1: jax.Array, f2: jax.Array, pool: str = "max"):
  """Pools the larger of two feature maps down to the spatial size of the smaller.

  Args:
    f1: `(B, H1, W1, m)`.
    f2: `(B, H2, W2, n)`.
    pool: "max" (the paper's choice) or "avg" (adaptive average pooling, as in the
      PyTorch re-implementations).

  Returns:
    `(f1, f2)` with equal `H, W`. Raises ValueError where the larger map is not an
    integer multiple of the smaller in both height and width.
  """
  if pool not in POOLING:
    raise ValueError(f"pool={pool!r} is not supported; use one of {POOLING}.")
  if f1.ndim != 4 or f2.ndim != 4:
    raise ValueError(
        f"FSP needs channels-last feature maps (B, H, W, C) (or token maps (B, N, C)); "
        f"got shapes {f1.shape} and {f2.shape}.")
  if f1.shape[0] != f2.shape[0]:
    raise ValueError(
        f"FSP feature maps must come from the same batch; got batch sizes {f1.shape[0]} "
        f"and {f2.shape[0]}.")
  (h1, w1), (h2, w2) = f1.shape[1:3], f2.shape[1:3]
  if (h1, w1) == (h2, w2):
    return f1, f2
  if h1 >= h2 and w1 >= w2 and h1 % h2 == 0 and w1 % w2 == 0:
    return _pool_to(f1, h2, w2, pool), f2
  if h2 >= h1 and w2 >= w1 and h2 % h1 == 0 and w2 % w1 == 0:
    return f1, _pool_to(f2, h1, w1, pool)
  raise ValueError(
      f"FSP feature maps of spatial sizes {h1}x{w1} and {h2}x{w2} cannot be paired: the "
      "larger must be an integer multiple of the smaller in height and width. Pick "
      "fsp_pairs whose maps satisfy this.")


def tokens_to_grid(tokens: jax.Array, grid: Optional[Tuple[int, int]] = None,
                   drop_leading: int = 0) -> jax.Array:
  """A transformer's token map as a feature map: `(B, N, C)` -> `(B, h, w, C)`.

  Drops the first `drop_leading` tokens (a class token: 1; class and register tokens:
  1 + registers), then lays the remaining `h * w` out row by row, as patch embeddings
  number them. The result pairs with convolutional maps of divisible sizes like any
  feature map (the larger pooled down, `match_spatial`).

  Args:
    tokens: `(B, N, C)`.
    grid: `(h, w)` with `h * w = N - drop_leading`; None = a square grid.
    drop_leading: leading tokens to drop.

  Raises:
    ValueError (one line) where the tokens do not fill the grid.
  """
  if tokens.ndim != 3:
    raise ValueError(f"a token map is (B, N, C); got shape {tuple(tokens.shape)}.")
  if drop_leading < 0 or drop_leading >= tokens.shape[1]:
    raise ValueError(f"drop_leading={drop_leading} leaves no tokens of the "
                     f"{tokens.shape[1]}.")
  b, n, c = tokens.shape
  n -= drop_leading
  if grid is None or not tuple(grid):
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(
          f"a token map of {n} tokens (after dropping {drop_leading}) is not a square "
          "grid: drop the class/register tokens (drop_leading, config "
          "<role>.drop_tokens) or give the grid (h, w) (config <role>.token_grid).")
    grid = (side, side)
  h, w = (int(v) for v in grid)
  if h * w != n:
    raise ValueError(f"token grid {h}x{w} holds {h * w} tokens, the token map has {n} "
                     f"(after dropping {drop_leading} leading ones); give a grid of "
                     f"{n} tokens or drop the class/register tokens.")
  return tokens[:, drop_leading:].reshape(b, h, w, c)


def _as_maps(f1: jax.Array, f2: jax.Array):
  """Token maps `(B, N, C)` as `(B, H, W, C)` maps: two of equal N as `(B, N, 1, C)`
  (Eq. 1 with H * W = N); otherwise each as a square grid (`tokens_to_grid`)."""
  if f1.ndim == 3 and f2.ndim == 3 and f1.shape[1] == f2.shape[1]:
    return f1[:, :, None, :], f2[:, :, None, :]
  return tuple(tokens_to_grid(f) if f.ndim == 3 else f for f in (f1, f2))


def fsp_matrix(f1: jax.Array, f2: jax.Array, pool: str = "max") -> jax.Array:
  """The FSP matrix of two feature maps of the same input (Eq. 1).

  G[b, i, j] = sum_{h, w} f1[b, h, w, i] * f2[b, h, w, j] / (H * W)

  Args:
    f1: `(B, H1, W1, m)`, the first feature map (e.g. a section's input), or a
      transformer's token map `(B, N, m)`: the N tokens are the positions.
    f2: `(B, H2, W2, n)` or `(B, N2, n)`, the second (e.g. the section's output).
      Where one map is an integer multiple of the other in height and width, the larger
      is pooled down first (`pool`: "max", the paper's choice, or "avg"). Two token maps
      of equal N pair token by token (H * W = N); a token map paired with anything else
      is viewed as a square grid first: drop class or register tokens and give other
      grids with `tokens_to_grid`.

  Returns:
    `(B, m, n)` float32, whatever the input dtype (bf16 activations are upcast).
  """
  f1, f2 = match_spatial(*_as_maps(f1, f2), pool)
  f1 = f1.astype(jnp.float32)
  f2 = f2.astype(jnp.float32)
  h, w = f1.shape[1:3]
  # HIGHEST: on TPU the default float32 matmul precision is bf16 passes, which would
  # make the teacher's FSP targets noisy.
  gram = jnp.einsum("bhwm,bhwn->bmn", f1, f2, precision=jax.lax.Precision.HIGHEST)
  return gram / (h * w)


def default_fsp_pairs(feature_names) -> Tuple[FspPair, ...]:
  """One pair per section: (stem, section 1), (section 1, section 2), ...

  Args:
    feature_names: a network's feature names in network order (e.g. a ResNet's
      `feature_names`, `('stem', 'section1', ...)`): name pairs; or the number of
      features: index pairs.
  """
  if isinstance(feature_names, int):
    feature_names = tuple(range(feature_names))
  names = tuple(feature_names)
  return tuple((names[k], names[k + 1]) for k in range(len(names) - 1))


def resolve_pairs(fsp_pairs: Sequence[Tuple], feature_names: Sequence[str],
                  what: str = "FSP pair") -> Tuple[Tuple[str, str], ...]:
  """Name pairs from pairs of names or of indices into `feature_names`.

  Raises ValueError naming the valid names where a name or index does not exist.
  """
  names = tuple(feature_names)
  return tuple((resolve_name(i, names, what), resolve_name(j, names, what))
               for i, j in fsp_pairs)


def resolve_name(key, feature_names: Sequence[str], what: str = "feature") -> str:
  """A feature name from a name or an index into `feature_names` (network order)."""
  names = tuple(feature_names)
  if isinstance(key, str):
    if key in names:
      return key
    raise ValueError(f"{what} {key!r} is not a feature of the network; its features "
                     f"are {names} (or indices 0..{len(names) - 1}).")
  if isinstance(key, numbers.Integral) and not isinstance(key, bool) and (
      0 <= key < len(names)):
    return names[int(key)]
  raise ValueError(f"{what} {key!r} is out of range: the network returns {len(names)} "
                   f"feature maps, {names} (indices 0..{len(names) - 1}).")


def fsp_matrices(features, fsp_pairs: Optional[Sequence[FspPair]] = None,
                 pool: str = "max") -> Tuple[jax.Array, ...]:
  """FSP matrices of one network for each pair of features.

  Args:
    features: the network's feature maps, each `(B, H_k, W_k, C_k)`: a dict by name
      (the models of this package: `{'stem': ..., 'section1': ...}`) or a sequence.
    fsp_pairs: `(i, j)` keys of `features` (names for a dict, indices for a sequence);
      for a sequence, default one pair per section. A dict needs its pairs named
      (`default_fsp_pairs(model.feature_names)`): JAX transformations return dicts
      in sorted key order, not network order.

  Returns:
    one `(B, C_i, C_j)` float32 matrix per pair.
  """
  if isinstance(features, Mapping):
    if fsp_pairs is None:
      raise ValueError(
          "features are a dict: name the fsp_pairs, e.g. "
          "fsp_pairs=default_fsp_pairs(model.feature_names) for one pair per section.")
    keys = tuple(features)
  else:
    keys = tuple(range(len(features)))
    if fsp_pairs is None:
      fsp_pairs = default_fsp_pairs(len(features))
  out = []
  for i, j in fsp_pairs:
    if isinstance(i, bool) or isinstance(j, bool) or i not in keys or j not in keys:
      raise ValueError(
          f"FSP pair ({i!r}, {j!r}) names a feature the network does not return; it "
          f"returns {len(keys)} feature maps: {keys}.")
    out.append(fsp_matrix(features[i], features[j], pool))
  return tuple(out)


def _check_matrices(teacher_matrices, student_matrices, weights):
  """Validates matching pairs; returns the per-pair weights (default all 1.0)."""
  if len(teacher_matrices) != len(student_matrices):
    raise ValueError(
        f"teacher has {len(teacher_matrices)} FSP matrices, student "
        f"{len(student_matrices)}: both must use the same fsp_pairs.")
  if weights is None:
    weights = (1.0,) * len(student_matrices)
  if len(weights) != len(student_matrices):
    raise ValueError(
        f"{len(weights)} FSP pair weights given for {len(student_matrices)} fsp_pairs; "
        "give one weight per pair.")
  for k, (gt, gs) in enumerate(zip(teacher_matrices, student_matrices)):
    if gt.shape != gs.shape:
      raise ValueError(
          f"FSP pair {k}: teacher matrix is {tuple(gt.shape[1:])}, student matrix is "
          f"{tuple(gs.shape[1:])} (batch {gt.shape[0]} vs {gs.shape[0]}). FSP needs equal "
          "channel counts on both sides: give the student the teacher's section widths, "
          "set fsp.adapter=True (learned 1x1 adapters), or change fsp_pairs.")
  return weights


REDUCTIONS = ("sum", "mean")


def fsp_distance(teacher_matrices: Sequence[jax.Array],
                 student_matrices: Sequence[jax.Array],
                 weights: Optional[Sequence[float]] = None,
                 reduction: str = "sum") -> jax.Array:
  """Eq. 2 from precomputed matrices: mean over the batch of weighted squared norms.

  L = (1/B) sum_b sum_i lambda_i || G_i^T[b] - G_i^S[b] ||_F^2

  Args:
    teacher_matrices: per pair `(B, m_i, n_i)`; no gradient flows into them.
    student_matrices: per pair `(B, m_i, n_i)`.
    weights: lambda_i per pair; default 1 for each (the paper: all equal).
    reduction: "sum" over the m_i x n_i entries (Eq. 2), or "mean" over them (the
      PyTorch re-implementations' scale: lambda_i / (m_i n_i); learning rates differ).

  Returns:
    a float32 scalar.
  """
  return jnp.mean(fsp_distances(teacher_matrices, student_matrices, weights, reduction))


def fsp_distances(teacher_matrices: Sequence[jax.Array],
                  student_matrices: Sequence[jax.Array],
                  weights: Optional[Sequence[float]] = None,
                  reduction: str = "sum") -> jax.Array:
  """Eq. 2 per example: `(B,)` of sum_i lambda_i || G_i^T[b] - G_i^S[b] ||_F^2.

  Its batch mean is `fsp_distance`. Arguments as for `fsp_distance`.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"FSP reduction {reduction!r} is not one of {REDUCTIONS}.")
  weights = _check_matrices(teacher_matrices, student_matrices, weights)
  total = jnp.zeros(student_matrices[0].shape[:1], jnp.float32)
  for gt, gs, lam in zip(teacher_matrices, student_matrices, weights):
    diff = jax.lax.stop_gradient(gt) - gs
    if reduction == "mean":
      lam = lam / (gs.shape[1] * gs.shape[2])
    total = total + lam * jnp.sum(jnp.square(diff), axis=(1, 2))
  return total


def fsp_loss(teacher_features: Sequence[jax.Array],
             student_features: Sequence[jax.Array],
             fsp_pairs: Optional[Sequence[FspPair]] = None,
             weights: Optional[Sequence[float]] = None,
             pool: str = "max", reduction: str = "sum") -> jax.Array:
  """The FSP loss of Eq. 2 between a frozen teacher and a student.

  Args:
    teacher_features: teacher feature maps, each `(B, H_k, W_k, C_k)`, a dict by name
      or a sequence. The teacher carries no gradient (stop_gradient), so only the
      student is trained.
    student_features: student feature maps, same keys and channel counts at the
      features named by `fsp_pairs`.
    fsp_pairs: `(i, j)` feature keys (names for dicts); default for sequences one
      pair per section.
    weights: lambda_i per pair; default equal (1.0).
    pool: "max" (paper) or "avg" for pairs of different spatial size.
    reduction: "sum" (Eq. 2) or "mean" over each matrix's entries.

  Returns:
    a float32 scalar: batch mean of sum_i lambda_i ||G_i^T - G_i^S||_F^2.
  """
  teacher_features = jax.tree.map(jax.lax.stop_gradient, teacher_features)
  return fsp_distance(fsp_matrices(teacher_features, fsp_pairs, pool),
                      fsp_matrices(student_features, fsp_pairs, pool), weights,
                      reduction)
