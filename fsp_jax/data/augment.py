"""Augmentation of training batches, on the host (NumPy) or on the device (jitted ops).

`Augment` says how (one small frozen, hashable dataclass: a static jit argument);
`host_augment` and `device_augment` apply it to a batch: a random-resized crop where
it has a `crop_size` and is enabled, a centre crop where it has a `crop_size` and is
not, the paper's pad-crop-flip where it is enabled, nothing otherwise. Every draw is a
pure function of `(seed, step)` (and of an image's position in the global batch), so
a resumed run sees exactly the batches an uninterrupted one would. The host and
device draws differ (NumPy and `jax.random`): the two pipelines give different,
equally valid augmentations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class Augment:
  """How training images are augmented.

  Attributes:
    enabled: False: none (a centre crop where `crop_size`).
    pad: zero padding (pixels each side) before the random crop back to the image's
      size (the paper: 4; 0: no crop).
    flip: random horizontal flips.
    crop_size: `(H, W)`: random-resized crops of this size for training (centre crops
      where not `enabled`), for images larger than what the model sees (the test
      images are centre-cropped to it by `with_crop`); (): off.
  """
  enabled: bool = True
  pad: int = 4
  flip: bool = False
  crop_size: Tuple[int, ...] = ()

  def __post_init__(self):
    crop = tuple(int(s) for s in (self.crop_size or ()))
    if len(crop) not in (0, 2) or any(s < 1 for s in crop):
      raise ConfigError(f"Augment crop_size must be () or (height, width) >= 1; got "
                        f"{self.crop_size!r}; set config.data.crop_size accordingly.")
    if int(self.pad) < 0:
      raise ConfigError(f"Augment pad must be >= 0; got {self.pad!r}; set "
                        "config.data.pad to 0 or more.")
    object.__setattr__(self, "enabled", bool(self.enabled))
    object.__setattr__(self, "pad", int(self.pad))
    object.__setattr__(self, "flip", bool(self.flip))
    object.__setattr__(self, "crop_size", crop)

  @classmethod
  def none(cls, crop_size: Sequence[int] = ()) -> "Augment":
    """No augmentation (a centre crop of `crop_size` where given)."""
    return cls(enabled=False, crop_size=crop_size)

  @classmethod
  def of(cls, data_config: Any, enabled: bool, crop_size=()) -> "Augment":
    """From a config's `data` block (`.pad`, `.flip`; 4 and False where absent) and a
    stage schedule's `augment` flag; `crop_size`: the data set's (`Dataset.crop_size`,
    None or `(H, W)`)."""
    return cls(enabled=enabled, pad=getattr(data_config, "pad", 4),
               flip=getattr(data_config, "flip", False), crop_size=crop_size or ())


def host_augment(images: np.ndarray, augment: Augment, seed: int, step: int,
                 rows: slice = slice(None)) -> np.ndarray:
  """`augment` applied to the global training batch of `(seed, step)` on the host.

  Args:
    images: uint8 `(B, H, W, C)`, the whole global batch: the pad-crop-flip draws
      cover all B images (`np.random.default_rng([seed, step, 1])`), so a process's
      rows are augmented the same however the batch is split over processes.
    rows: the rows of the batch wanted (a process's contiguous slice); random-resized
      crops are drawn only for them, image k from
      `np.random.default_rng([seed, step, 2, k])`.
  Returns:
    uint8 `(len(rows), H', W', C)`: `crop_size` where given, else `(H, W)`.
  """
  crop = augment.crop_size
  if crop and augment.enabled:
    lo, hi, _ = rows.indices(len(images))
    rngs = [np.random.default_rng([seed, step, 2, k]) for k in range(lo, hi)]
    return random_resized_crop(images[rows], rngs, crop, flip=augment.flip)
  if crop:
    return center_crop(images[rows], crop)
  if augment.enabled:
    rng = np.random.default_rng([seed, step, 1])
    return augment_batch(images, rng, pad=augment.pad, flip=augment.flip)[rows]
  return images[rows]


def device_augment(images: jax.Array, augment: Augment, seed, step) -> jax.Array:
  """`augment` applied to a training batch on the device, keyed by
  `augment_key(seed, step)` (seed and step may be traced; `augment` is static).
  uint8 `(B, H, W, C)` -> `(B, H', W', C)`: `crop_size` where given, else `(H, W)`."""
  crop = augment.crop_size
  if crop and augment.enabled:
    return device_random_resized_crop(images, augment_key(seed, step), crop,
                                      flip=augment.flip)
  if crop:
    h, w = images.shape[1:3]
    top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
    return images[:, top:top + crop[0], left:left + crop[1]]
  if augment.enabled:
    return device_pad_crop_flip(images, augment_key(seed, step), pad=augment.pad,
                                flip=augment.flip)
  return images


# ---- on the host (NumPy) -------------------------------------------------------------


def center_crop(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """The central `size` window of uint8 `(B, H, W, C)`: `(B, size[0], size[1], C)`."""
  h, w = images.shape[1:3]
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return np.ascontiguousarray(images[:, top:top + size[0], left:left + size[1]])


def random_resized_crop(images: np.ndarray, rngs: Sequence[np.random.Generator],
                        size: Tuple[int, int], flip: bool = False, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """The usual ImageNet augmentation (torchvision's RandomResizedCrop), per image.

  A window of a random fraction `scale` of the area and aspect ratio `ratio`
  (log-uniform) is cut out and resized (bilinear) to `size`; after 10 failed draws, the
  largest central window of an allowed ratio. Then a random horizontal flip if `flip`.

  Args:
    images: uint8 `(B, H, W, C)`.
    rngs: one Generator per image (so a crop does not depend on the batch's split
      over processes).
  Returns:
    uint8 `(B, size[0], size[1], C)`.
  """
  from PIL import Image
  b, h, w, c = images.shape
  out = np.empty((b, size[0], size[1], c), np.uint8)
  log_ratio = np.log(ratio)
  for k, rng in zip(range(b), rngs):
    for _ in range(10):
      area = h * w * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(*log_ratio))
      cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        break
    else:
      aspect = min(max(w / h, ratio[0]), ratio[1])
      cw, ch = (w, int(round(w / aspect))) if w / h < aspect else (
          int(round(h * aspect)), h)
      cw, ch = min(cw, w), min(ch, h)
      top, left = (h - ch) // 2, (w - cw) // 2
    window = images[k, top:top + ch, left:left + cw]
    img = Image.fromarray(window[..., 0] if c == 1 else window)
    resized = np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), np.uint8)
    out[k] = resized.reshape(size[0], size[1], c)
    if flip and rng.random() < 0.5:
      out[k] = out[k, :, ::-1]
  return out


def augment_batch(images: np.ndarray, rng: np.random.Generator, pad: int = 4,
                  flip: bool = False) -> np.ndarray:
  """The paper's augmentation: zero-pad `pad` pixels each side, random crop back.

  Args:
    images: uint8 `(B, H, W, C)`.
  Returns:
    uint8 `(B, H, W, C)`, each image an independent random crop (and optional flip).
  """
  b, h, w, _ = images.shape
  out = images
  if pad:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]  # (B, H)
    cols = dx[:, None] + np.arange(w)[None, :]  # (B, W)
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    mask = rng.random(b) < 0.5
    out = np.where(mask[:, None, None, None], out[:, :, ::-1], out)
  return out



# ---- on the device (jitted ops) ------------------------------------------------------
# The training images live on the device(s); a step's batch is gathered there by its
# example indices (`feeding.device_train_batch`) and augmented by jitted ops keyed by
# `(seed, step)`: still a pure function of `(seed, step)`, so resuming stays exact.


def augment_key(seed, step) -> jax.Array:
  """The PRNG key of the device augmentation of `step` (seed and step may be traced)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), seed), step)


def device_pad_crop_flip(images: jax.Array, key: jax.Array, pad: int = 4,
                         flip: bool = False) -> jax.Array:
  """The paper's augmentation as jitted ops: zero-pad `pad` pixels, random crop back,
  optionally a random horizontal flip. uint8 `(B, H, W, C)` -> `(B, H, W, C)`."""
  b, h, w, c = images.shape
  k_crop, k_flip = jax.random.split(key)
  out = images
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  if flip:
    mask = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(mask[:, None, None, None], out[:, :, ::-1], out)
  return out


def device_random_resized_crop(images: jax.Array, key: jax.Array, size: Tuple[int, int],
                               flip: bool = False, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """RandomResizedCrop as jitted ops: per image a window of a random fraction `scale`
  of the area and log-uniform aspect `ratio` (clipped to the image), resized
  bilinearly to `size`, then an optional flip. uint8 `(B, H, W, C)` -> `(B, *size, C)`.

  One draw per image (no retries): a window that does not fit is clipped to the image,
  where torchvision draws again; the distribution of crops differs slightly.
  """
  b, h, w, c = images.shape
  k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(key, 5)
  area = h * w * jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=np.log(ratio[0]),
                                      maxval=np.log(ratio[1])))
  cw = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
  top = jax.random.uniform(k_y, (b,)) * (h - ch)
  left = jax.random.uniform(k_x, (b,)) * (w - cw)

  def crop(image, ch, cw, top, left):
    sy, sx = size[0] / ch, size[1] / cw
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32), (size[0], size[1], c), (0, 1),
        jnp.stack([sy, sx]), jnp.stack([-top * sy, -left * sx]), "linear",
        antialias=False)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
  out = jax.vmap(crop)(images, ch, cw, top, left)
  if flip:
    mask = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(mask[:, None, None, None], out[:, :, ::-1], out)
  return out

