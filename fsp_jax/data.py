"""Data: sources (tensorflow-datasets, image folders, a bundled quickstart set),
paper augmentation, and global batches sharded over devices and processes.

Data sets here are small enough to hold in host memory as uint8 arrays (CIFAR: 150 MB),
so the input pipeline is NumPy indexing plus a prefetch thread. The batch at step `s`
is a pure function of `(seed, s)`: a resumed run sees exactly the data an
uninterrupted one would.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import os
import queue
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax.validation import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set in host memory.

  Attributes:
    train_images, test_images: uint8 `(N, H, W, C)`.
    train_labels, test_labels: int32 `(N,)`.
    num_classes: number of classes.
    mean, std: float32 `(C,)` per-channel statistics of the training images (0-255).
    name: where it came from.
    crop_size: `(h, w)` where training images are larger than what the model sees:
      training batches are random-resized crops (or center crops) of this size, and
      test images are already center-cropped to it. None: images are used as they are.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  name: str
  crop_size: Optional[Tuple[int, int]] = None

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """The model's input `(H, W, C)`: the test images' shape."""
    return tuple(self.test_images.shape[1:])


def channel_mean_std(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std `(C,)` (float64; std 1 where 0) of uint8 `(..., C)`.

  From each channel's 256-bin histogram: exact, and without the float copy of the
  images (1.2 GB for CIFAR's 50k training images, seconds of a worker's start-up).
  """
  flat = images.reshape(-1, images.shape[-1])
  levels = np.arange(256, dtype=np.float64)
  mean, std = [], []
  for c in range(flat.shape[1]):
    p = np.bincount(flat[:, c], minlength=256) / len(flat)
    m = p @ levels
    mean.append(m)
    std.append(np.sqrt(p @ (levels - m) ** 2))
  mean, std = np.asarray(mean), np.asarray(std)
  return mean, np.where(std > 0, std, 1.0)


def _finish(name, train_images, train_labels, test_images, test_labels,
            num_classes) -> Dataset:
  train_images = np.ascontiguousarray(train_images, np.uint8)
  mean, std = channel_mean_std(train_images)
  return Dataset(train_images, np.asarray(train_labels, np.int32),
                 np.ascontiguousarray(test_images, np.uint8),
                 np.asarray(test_labels, np.int32), int(num_classes),
                 mean.astype(np.float32), std.astype(np.float32), name)


def _resize(image: np.ndarray, size: Optional[Tuple[int, int]]) -> np.ndarray:
  """uint8 `(H, W)` or `(H, W, C)` -> `(size[0], size[1], C)` (bilinear); grey -> RGB
  only where resizing (a data set of grey images stays one channel)."""
  image = np.asarray(image)
  if size is None or image.shape[:2] == tuple(size):
    return image
  from PIL import Image
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  img = Image.fromarray(image.astype(np.uint8))
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), np.uint8)


def load_tfds(name: str, data_dir: Optional[str] = None,
              train_split: str = "train", test_split: str = "test",
              image_size: Optional[Tuple[int, int]] = None) -> Dataset:
  """Loads an image classification data set of tensorflow-datasets into memory.

  Uses `tfds.data_source` (random access over ArrayRecord, no TensorFlow needed). The
  data set must be prepared in `data_dir` (ArrayRecord format), e.g. once with
  `tfds build cifar10 --file_format=array_record` or
  `tfds.builder(name).download_and_prepare(file_format='array_record')`.
  `image_size` `(H, W)` resizes every image (needed where sizes vary, e.g.
  `caltech_birds2011`, CUB-200-2011).
  """
  import tensorflow_datasets as tfds  # Imported lazily: heavy, and optional offline.
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses.
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f"unknown tensorflow-datasets data set {name!r} ({first_line[:200]}); "
                     "check the name with `tfds.list_builders()`.") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ConfigError(f"data set {name!r} has no 'image' and 'label' features; "
                     "fsp_jax trains image classifiers.")
  num_classes = features["label"].num_classes
  arrays = []
  for split in (train_split, test_split):
    arrays += _read_tfds_split(tfds, name, split, data_dir, image_size)
  return _finish(f"tfds:{name}", *arrays, num_classes)


def _read_tfds_split(tfds, name, split, data_dir, image_size=None):
  """`[images uint8 (N, H, W, C), labels int32 (N,)]` of one split.

  Prefers `tfds.data_source` (ArrayRecord, no TensorFlow). A data set prepared in the
  default TFRecord format (what `tfds.load` writes) is read through `tfds.load` where
  TensorFlow is installed. `image_size` `(H, W)` resizes every image.
  """
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # Not prepared as ArrayRecord, or not prepared at all.
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      raise ConfigError(
          f"tensorflow-datasets {name!r} split {split!r} cannot be read ({e}). Prepare "
          f"it once as ArrayRecord: `pip install tensorflow && tfds build {name} "
          "--file_format=array_record`, or use an image folder (data.source='folder')."
      ) from None
    if image_size is None:
      ds = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
      return [np.asarray(ds["image"], np.uint8), np.asarray(ds["label"], np.int32)]
    # Images of varied sizes do not batch: read them one by one.
    source = list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir)))
  n = len(source)
  first = source[0]
  shape = np.asarray(_resize(first["image"], image_size)).shape
  images = np.empty((n,) + tuple(shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for k in range(n):
    record = source[k] if k else first
    image = _resize(record["image"], image_size)
    if image.shape != shape:
      raise ConfigError(f"images of tfds {name!r} ({split}) differ in size ({shape} and "
                       f"{image.shape}); set the data set's image_size to resize them.")
    images[k] = image
    labels[k] = record["label"]
  return [images, labels]


def _decode_image(path: str, size: Optional[Tuple[int, int]]) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
      return np.asarray(img, np.uint8)
  except (UnidentifiedImageError, OSError) as e:
    raise ConfigError(f"{path} is not a readable image ({e}); remove it from the image "
                     "folder or replace it.") from None


_FOLDER_CACHE = {}


def load_image_folder(root: str, image_size: Optional[Tuple[int, int]] = None,
                      num_workers: int = 8, cache_dir: str = "") -> Dataset:
  """Loads `ROOT/train/<class>/*` and `ROOT/test/<class>/*` (JPEG or PNG) into memory.

  Classes are the sub-folder names in sorted order (the same in both splits).
  `image_size` `(H, W)` resizes every image; without it all images must share a size.
  Decoded folders are kept for the process's lifetime (several pipelines in one
  process decode once). With `cache_dir`, the decoded arrays are also written there
  (`folder-<key>.npz`, uncompressed) and read back by later processes, e.g. the
  parallel workers of `experiments/reproduce.py --jobs`: the key covers the root, the size
  and every file's name, size and modification time, so a changed folder is decoded
  again.
  """
  key = (os.path.abspath(root), tuple(image_size) if image_size else None)
  if key not in _FOLDER_CACHE:
    _FOLDER_CACHE[key] = _load_image_folder(root, image_size, num_workers, cache_dir)
  return _FOLDER_CACHE[key]


def _folder_cache_path(cache_dir: str, root: str, image_size, splits) -> str:
  """`cache_dir/folder-<sha1 of the root, size and each file's name, size, mtime>.npz`."""
  import hashlib
  h = hashlib.sha1(repr((os.path.abspath(root), image_size)).encode())
  for split in ("train", "test"):
    classes, files, labels = splits[split]
    h.update(repr(classes).encode())
    for path, label in zip(files, labels):
      st = os.stat(path)
      h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return os.path.join(cache_dir, f"folder-{h.hexdigest()[:16]}.npz")


def _load_image_folder(root, image_size, num_workers, cache_dir="") -> Dataset:
  if not os.path.isdir(root):
    raise ConfigError(f"image folder {root!r} does not exist; expected ROOT/train/<class>/ "
                     "and ROOT/test/<class>/ sub-folders.")
  splits = {}
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise ConfigError(f"image folder {root!r} has no {split!r} split: expected "
                       f"{split_dir}/<class>/<image files>.")
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
      raise ConfigError(f"{split_dir} has no class sub-folders; expected "
                       f"{split_dir}/<class>/<image files>.")
    files, labels = [], []
    for label, cls in enumerate(classes):
      names = sorted(f for f in os.listdir(os.path.join(split_dir, cls))
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not names:
        raise ConfigError(f"class folder {os.path.join(split_dir, cls)} holds no "
                         f"{'/'.join(IMAGE_EXTENSIONS)} image; remove it or add images.")
      files += [os.path.join(split_dir, cls, f) for f in names]
      labels += [label] * len(names)
    splits[split] = (classes, files, labels)
  if splits["train"][0] != splits["test"][0]:
    raise ConfigError(f"image folder {root!r}: train classes {splits['train'][0]} differ "
                     f"from test classes {splits['test'][0]}.")
  cache = cache_dir and _folder_cache_path(cache_dir, root, image_size, splits)
  if cache and os.path.exists(cache):
    with np.load(cache) as z:
      arrays = [z["train_images"], z["train_labels"], z["test_images"], z["test_labels"]]
    return _finish(f"folder:{root}", *arrays, len(splits["train"][0]))
  arrays = []
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for split in ("train", "test"):
      _, files, labels = splits[split]
      images = list(pool.map(lambda p: _decode_image(p, image_size), files,
                             chunksize=256))
      shapes = {im.shape for im in images}
      if len(shapes) > 1:
        raise ConfigError(f"images in {root}/{split} have different sizes {sorted(shapes)[:4]}"
                         "; set the data set's image_size to resize them.")
      arrays += [np.stack(images), np.asarray(labels)]
  if cache:  # Written whole, then renamed: a reader never sees half a file.
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **dict(zip(("train_images", "train_labels", "test_images",
                              "test_labels"), arrays)))
    os.replace(tmp, cache)
  return _finish(f"folder:{root}", *arrays, len(splits["train"][0]))


def load_digits(image_size: int = 16, test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes).

  Needs no download: the quickstart's data. Pixels (0-16) are scaled to 0-255 and the
  images upsampled to `image_size` (a multiple of 8) with nearest-neighbour. The
  train/test split is fixed (stratified by position within each class).
  """
  if image_size % 8:
    raise ConfigError(f"digits image_size must be a multiple of 8; got {image_size}.")
  pixels, labels = _sklearn_digits()
  images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
  factor = image_size // 8
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)[..., None]
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    is_test[idx[:int(round(len(idx) * test_fraction))]] = True
  return _finish("sklearn:digits", images[~is_test], labels[~is_test], images[is_test],
                 labels[is_test], 10)


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
  """The digits' pixels `(1797, 64)` (0-16) and labels, as scikit-learn ships them.

  Reads scikit-learn's `digits.csv.gz` without importing scikit-learn, which takes
  seconds (it imports SciPy): every quickstart and test run starts faster.
  """
  spec = importlib.util.find_spec("sklearn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                      "digits.csv.gz") if spec else ""
  if os.path.exists(path):
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int32)
  from sklearn.datasets import load_digits as sk_load_digits  # Another layout.
  digits = sk_load_digits()
  return digits.data, digits.target.astype(np.int32)


def load_dataset(config) -> Dataset:
  """Loads the data set a config's `data` block names (source: tfds, folder, digits).

  With `crop_size`, training images stay at their (resized) size for random-resized
  crops and the test images are center-cropped to `crop_size` once here.
  """
  source = config.source
  size = tuple(config.image_size) if config.get("image_size") else None
  if source == "tfds":
    dataset = load_tfds(config.name, config.get("data_dir") or None, image_size=size)
  elif source == "folder":
    dataset = load_image_folder(config.root, size,
                                cache_dir=config.get("cache_dir") or "")
  elif source == "digits":
    size = size or (16, 16)
    if size[0] != size[1]:
      raise ConfigError(f"digits images are square; got image_size {size}.")
    dataset = load_digits(size[0])
  else:
    raise ConfigError(f"unknown data source {source!r}; use 'tfds', 'folder' or 'digits'.")
  if config.get("classes") or config.get("train_per_class"):
    dataset = select(dataset, tuple(config.get("classes") or ()),
                     config.get("train_per_class") or 0)
  if config.get("crop_size"):
    dataset = with_crop(dataset, tuple(config.crop_size))
  return dataset


def select(dataset: Dataset, classes: Sequence[int] = (),
           train_per_class: int = 0) -> Dataset:
  """A part of `dataset`: e.g. one task for a teacher, another with few examples for a
  student (transfer learning).

  Args:
    classes: class indices to keep, relabelled 0, 1, ... in this order; () keeps all.
    train_per_class: keep the first this many training examples of each class (in
      the source's order: sorted file names for image folders); 0 keeps all. The test
      split keeps every example of the kept classes.
  Returns:
    the new Dataset, its mean and std recomputed from its training images.
  """
  classes = tuple(classes) or tuple(range(dataset.num_classes))
  bad = [c for c in classes if not 0 <= c < dataset.num_classes]
  if bad or len(set(classes)) != len(classes):
    raise ConfigError(f"classes {classes} must be distinct indices in 0.."
                     f"{dataset.num_classes - 1} of {dataset.name}.")
  arrays = []
  for images, labels, cap in ((dataset.train_images, dataset.train_labels,
                               train_per_class),
                              (dataset.test_images, dataset.test_labels, 0)):
    keep = []
    for c in classes:
      idx = np.flatnonzero(labels == c)
      if cap and len(idx) < cap:
        raise ConfigError(f"class {c} of {dataset.name} has {len(idx)} training "
                         f"examples, fewer than train_per_class={cap}.")
      keep.append(idx[:cap] if cap else idx)
    keep = np.concatenate(keep)
    relabel = np.zeros(dataset.num_classes, np.int32)
    relabel[list(classes)] = np.arange(len(classes))
    arrays += [images[keep], relabel[labels[keep]]]
  part = _finish(f"{dataset.name}[classes {classes}]", *arrays, len(classes))
  return dataclasses.replace(part, crop_size=dataset.crop_size)


def with_crop(dataset: Dataset, crop_size: Tuple[int, int]) -> Dataset:
  """`dataset` trained on random-resized crops of `crop_size`, tested on center crops."""
  h, w = dataset.test_images.shape[1:3]
  if crop_size[0] > h or crop_size[1] > w:
    raise ConfigError(f"crop_size {crop_size} exceeds the images' size {(h, w)}; set "
                     "the data set's image_size to at least crop_size.")
  return dataclasses.replace(dataset, test_images=center_crop(dataset.test_images,
                                                              crop_size),
                             crop_size=crop_size)


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


# ---- the device-resident pipeline ---------------------------------------------------
# The training images live on the device(s); a step's batch is gathered there by its
# example indices (`train_batch_indices`, the host pipeline's) and augmented by jitted
# ops keyed by `(seed, step)`: still a pure function of `(seed, step)`, so resuming
# stays exact. The random draws differ from the host pipeline's (NumPy), so the two
# pipelines give different (equally valid) data orders of augmentation.


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


def device_train_data(dataset: Dataset, mesh) -> Tuple[jax.Array, jax.Array]:
  """The training set on the devices, sharded by examples over the mesh's 'data'
  axis: images uint8 `(N', H, W, C)` and labels `(N',)`, N' = N rounded up to a
  multiple of the devices (the zero rows added are never drawn). Each device holds
  N'/D examples, so a data set D times one device's memory fits."""
  n, n_dev = len(dataset.train_labels), mesh.devices.size
  rows = -(-n // n_dev) * n_dev
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def put(x):
    if rows != n:
      x = np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], x.dtype)])
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return put(dataset.train_images), put(dataset.train_labels)


def take_rows(table: jax.Array, indices: jax.Array, mesh) -> jax.Array:
  """`table[indices]` for a `table` `(N, ...)` sharded by rows over the mesh's 'data'
  axis (`device_train_data`) and `indices` `(B,)`: `(B, ...)`, sharded along B.

  The table never moves: each device gathers the rows of the batch it holds (zeros
  for the others), and one reduce-scatter over the batch hands every device its
  slice of it.
  """
  rows = table.shape[0] // mesh.shape["data"]
  spec = jax.sharding.PartitionSpec

  def local(part, idx):
    lo = jax.lax.axis_index("data") * rows
    own = (idx >= lo) & (idx < lo + rows)
    got = jnp.take(part, jnp.clip(idx - lo, 0, rows - 1), axis=0).astype(jnp.int32)
    got = jnp.where(own.reshape(own.shape + (1,) * (got.ndim - 1)), got, 0)
    return jax.lax.psum_scatter(got, "data", scatter_dimension=0, tiled=True)
  out = jax.shard_map(local, mesh=mesh, in_specs=(spec("data"), spec()),
                      out_specs=spec("data"))(table, indices)
  return out.astype(table.dtype)


def device_train_batch(images: jax.Array, labels: jax.Array, indices: jax.Array,
                       seed, step, *, augment: bool = True, pad: int = 4,
                       flip: bool = False, crop_size=None, mesh=None):
  """The training batch of `indices` `(B,)` from device-resident `images` uint8
  `(N, H, W, C)` and `labels` `(N,)`, augmented with `augment_key(seed, step)`.
  Jittable; the images stay on the device. With `mesh`, `images` and `labels` are
  sharded over it by examples (`device_train_data`) and gathered by `take_rows`."""
  if mesh is not None:
    batch_images, batch_labels = (take_rows(images, indices, mesh),
                                  take_rows(labels, indices, mesh))
  else:
    batch_images = jnp.take(images, indices, axis=0)
    batch_labels = jnp.take(labels, indices, axis=0)
  key = augment_key(seed, step)
  if crop_size and augment:
    batch_images = device_random_resized_crop(batch_images, key, tuple(crop_size),
                                              flip=flip)
  elif crop_size:
    h, w = batch_images.shape[1:3]
    top, left = (h - crop_size[0]) // 2, (w - crop_size[1]) // 2
    batch_images = batch_images[:, top:top + crop_size[0], left:left + crop_size[1]]
  elif augment:
    batch_images = device_pad_crop_flip(batch_images, key, pad=pad, flip=flip)
  return {"image": batch_images, "label": batch_labels}


def train_batch_indices(num_examples: int, batch_size: int, seed: int,
                        step: int) -> np.ndarray:
  """Example indices of the global training batch at `step` `(batch_size,)`.

  Epoch e is a permutation drawn from `(seed, e)`; the last partial batch of an epoch is
  dropped. Depends only on `(seed, step)`, never on how often the process restarted.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"batch_size {batch_size} exceeds the {num_examples} training "
                     "examples; lower batch_size.")
  epoch, k = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[k * batch_size:(k + 1) * batch_size]


def train_batch(dataset: Dataset, batch_size: int, seed: int, step: int,
                augment: bool = True, pad: int = 4, flip: bool = False,
                process_index: int = 0, process_count: int = 1, extras=None):
  """This process's part of the global training batch at `step`.

  Returns `{'image': uint8 (B/P, H, W, C), 'label': int32 (B/P,)}` where P is the number
  of processes: each process reads and augments only its own slice. `extras`
  (`{name: array or tuple of arrays}`, each `(N, ...)` per training example, e.g. the
  teacher's cached FSP matrices) are gathered for the same examples under `name`.
  """
  idx = train_batch_indices(len(dataset.train_labels), batch_size, seed, step)
  rng = np.random.default_rng([seed, step, 1])
  local = batch_size // process_count
  lo = process_index * local
  sl = slice(lo, lo + local)
  images = dataset.train_images[idx]
  if dataset.crop_size and augment:
    rngs = [np.random.default_rng([seed, step, 2, k]) for k in range(lo, lo + local)]
    images = random_resized_crop(images[sl], rngs, dataset.crop_size, flip=flip)
    return {"image": images, "label": dataset.train_labels[idx][sl]}
  if dataset.crop_size:
    images = center_crop(images, dataset.crop_size)
  elif augment:
    images = augment_batch(images, rng, pad=pad, flip=flip)
  batch = {"image": images[sl], "label": dataset.train_labels[idx][sl]}
  for name, arrays in (extras or {}).items():
    batch[name] = jax.tree.map(lambda a: a[idx[sl]], arrays)
  return batch


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Shards the leading (batch) axis over the mesh's 'data' axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def to_global(batch, mesh: jax.sharding.Mesh):
  """Assembles each process's local batch into global arrays sharded over `mesh`."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()
  stop = threading.Event()

  def worker():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(sentinel)
    except BaseException as e:  # Surface producer errors in the consumer.
      q.put(e)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def train_batches(dataset: Dataset, mesh, batch_size: int, seed: int, start_step: int,
                  num_steps: int, augment: bool = True, pad: int = 4,
                  flip: bool = False, prefetch_size: int = 2, extras=None) -> Iterator:
  """Yields `(step, global_batch)` for steps `start_step .. num_steps-1`.

  `extras`: per-example host arrays gathered into each batch (see `train_batch`).
  """
  pcount, pindex = jax.process_count(), jax.process_index()
  if batch_size % (pcount * max(1, mesh.devices.size // pcount)):
    raise ConfigError(f"batch_size {batch_size} must be divisible by the number of "
                     f"devices ({mesh.devices.size}).")

  def host_batches():
    for step in range(start_step, num_steps):
      yield step, train_batch(dataset, batch_size, seed, step, augment=augment, pad=pad,
                              flip=flip, process_index=pindex, process_count=pcount,
                              extras=extras)

  for step, batch in prefetch(host_batches(), prefetch_size):
    yield step, to_global(batch, mesh)


@functools.lru_cache(maxsize=None)
def _subset_indices(num_examples: int, examples: int) -> np.ndarray:
  return np.sort(np.random.default_rng(0).permutation(num_examples)[:examples])


def test_split(dataset: Dataset, examples: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """`(images, labels)` of the test set, or of a fixed random subset of `examples`
  (test sets stored class by class make a prefix the wrong sample; the indices are
  drawn once per size)."""
  n = len(dataset.test_labels)
  if examples <= 0 or examples >= n:
    return dataset.test_images, dataset.test_labels
  keep = _subset_indices(n, examples)
  return dataset.test_images[keep], dataset.test_labels[keep]


def call_ranges(start: int, total: int, steps_per_call: int,
                every: Sequence[int] = ()) -> List[Tuple[int, int]]:
  """`(lo, hi)` step ranges of the jitted calls that run steps `start..total-1`:
  at most `steps_per_call` steps each, and every multiple of each of `every` (log,
  evaluation, checkpoint steps) ends a call, so that what happens at a step happens
  right after it."""
  out, lo = [], start
  while lo < total:
    hi = min(lo + steps_per_call, total)
    for n in every:
      if n and n > 0:
        hi = min(hi, (lo // n + 1) * n)
    out.append((lo, hi))
    lo = hi
  return out


def _local_rows(x: np.ndarray, axis: int) -> np.ndarray:
  """This process's slice of the global batch axis `axis` of a host array."""
  pcount, pindex = jax.process_count(), jax.process_index()
  local = x.shape[axis] // pcount
  return np.take(x, np.arange(pindex * local, (pindex + 1) * local), axis=axis)


def train_calls(dataset: Dataset, mesh, batch_size: int, seeds: Sequence[int],
                calls: Sequence[Tuple[int, int]], *, device: bool = False,
                augment: bool = True, pad: int = 4, flip: bool = False,
                prefetch_size: int = 2, extras=None) -> Iterator:
  """Yields `(lo, hi, inputs)` for each call range, what `train.jit_train_steps` takes.

  Host pipeline (`device=False`): `inputs` is the batches of steps lo..hi-1, uint8
  images `(K, [S,] B, H, W, C)` and labels `(K, [S,] B)` (K = hi - lo; the seed axis S
  only where there are several seeds, seed k's batches drawn with its seed), sharded
  over the mesh along B. Device pipeline: `inputs` holds only `indices` `(K, [S,] B)`
  int32, `seed` and `step` `(K, [S])`: the batches are gathered and augmented on the
  device (`device_train_batch`). Both are pure functions of (seed, step).

  `extras` (`{name: array or tuple of arrays}`, each `(N, ...)` per training example,
  e.g. the teacher's cached FSP matrices) are gathered on the host for the examples of
  each seed's batch, in either pipeline: `inputs[name]` `(K, [S,] B, ...)`.
  """
  n_dev, pcount = mesh.devices.size, jax.process_count()
  if batch_size % n_dev:
    raise ConfigError(f"batch_size {batch_size} must be divisible by the number of "
                     f"devices ({n_dev}).")
  multi = len(seeds) > 1
  seed_axes = (None,) if multi else ()

  def sharding(extra_dims):
    spec = (None,) + seed_axes + ("data",) + (None,) * extra_dims
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  def host_inputs(lo, hi):
    pindex = jax.process_index()
    per_step = []
    for step in range(lo, hi):
      if device:
        idx = [train_batch_indices(len(dataset.train_labels), batch_size, s, step)
               for s in seeds]
        inputs = {"indices": np.stack(idx).astype(np.int32),
                  "seed": np.asarray(seeds, np.int32),
                  "step": np.full((len(seeds),), step, np.int32)}
        for name, arrays in (extras or {}).items():  # The global batch's rows.
          inputs[name] = jax.tree.map(lambda a: np.stack([a[i] for i in idx]), arrays)
        per_step.append(inputs)
      else:
        batches = [train_batch(dataset, batch_size, s, step, augment=augment, pad=pad,
                               flip=flip, process_index=pindex, process_count=pcount,
                               extras=extras)
                   for s in seeds]
        per_step.append(jax.tree.map(lambda *xs: np.stack(xs), *batches))
    out = jax.tree.map(lambda *xs: np.stack(xs), *per_step)  # (K, S, ...)
    if not multi:
      out = jax.tree.map(lambda x: x[:, 0], out)
    return out

  def to_device(inputs):
    batch_axis = 1 + len(seed_axes)
    def batch_rows(x, local=False):
      return jax.make_array_from_process_local_data(
          sharding(x.ndim - batch_axis - 1),
          _local_rows(x, batch_axis) if local else x)
    if device:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      out = {name: jax.tree.map(lambda x: batch_rows(x, local=True), value)
             for name, value in inputs.items() if name not in ("seed", "step")}
      out.update(seed=jax.device_put(inputs["seed"], replicated),
                 step=jax.device_put(inputs["step"], replicated))
      return out
    return jax.tree.map(batch_rows, inputs)

  def produce():
    for lo, hi in calls:
      yield lo, hi, host_inputs(lo, hi)

  for lo, hi, inputs in prefetch(produce(), prefetch_size):
    yield lo, hi, to_device(inputs)


def eval_batches(images: np.ndarray, labels: np.ndarray, mesh, batch_size: int):
  """Yields global test batches covering every example once.

  The last batch is padded with zeros to `batch_size`; `'mask'` (float32 `(B,)`) is 1
  for real examples and 0 for padding, so no example is dropped or counted twice.
  """
  pcount, pindex = jax.process_count(), jax.process_index()
  if batch_size % mesh.devices.size:
    raise ConfigError(f"eval batch_size {batch_size} must be divisible by the number of "
                     f"devices ({mesh.devices.size}).")
  local = batch_size // pcount
  n = len(labels)
  for lo in range(0, n, batch_size):
    hi = min(lo + batch_size, n)
    img = np.zeros((batch_size,) + images.shape[1:], images.dtype)
    lab = np.zeros((batch_size,), np.int32)
    mask = np.zeros((batch_size,), np.float32)
    img[:hi - lo], lab[:hi - lo], mask[:hi - lo] = images[lo:hi], labels[lo:hi], 1.0
    sl = slice(pindex * local, (pindex + 1) * local)
    yield to_global({"image": img[sl], "label": lab[sl], "mask": mask[sl]}, mesh)


def map_examples(fn, images: np.ndarray, mesh, batch_size: int):
  """`fn` over every image in order, results gathered on the host.

  Args:
    fn: `images uint8 (B, H, W, C) -> pytree of (B, ...)` arrays, per example (e.g. a
      frozen network in inference mode); called on global batches sharded over `mesh`.
    images: uint8 `(N, H, W, C)`, the same on every process.

  Returns:
    the pytree of float32 host arrays `(N, ...)`.
  """
  n, out, lo = len(images), None, 0
  for batch in eval_batches(images, np.zeros((n,), np.int32), mesh, batch_size):
    result = fn(batch["image"])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      result = multihost_utils.process_allgather(result, tiled=True)
    result = jax.device_get(result)
    if out is None:
      out = jax.tree.map(lambda r: np.empty((n,) + r.shape[1:], np.float32), result)
    hi = min(lo + batch_size, n)
    jax.tree.map(lambda o, r: o.__setitem__(slice(lo, hi), r[:hi - lo]), out, result)
    lo = hi
  return out
