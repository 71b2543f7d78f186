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
import os
import queue
import threading
from typing import Iterator, Optional, Tuple

import jax
import numpy as np

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
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  name: str

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def _finish(name, train_images, train_labels, test_images, test_labels,
            num_classes) -> Dataset:
  train_images = np.ascontiguousarray(train_images, np.uint8)
  flat = train_images.reshape(-1, train_images.shape[-1]).astype(np.float64)
  mean, std = flat.mean(0), flat.std(0)
  std = np.where(std > 0, std, 1.0)
  return Dataset(train_images, np.asarray(train_labels, np.int32),
                 np.ascontiguousarray(test_images, np.uint8),
                 np.asarray(test_labels, np.int32), int(num_classes),
                 mean.astype(np.float32), std.astype(np.float32), name)


def load_tfds(name: str, data_dir: Optional[str] = None,
              train_split: str = "train", test_split: str = "test") -> Dataset:
  """Loads an image classification data set of tensorflow-datasets into memory.

  Uses `tfds.data_source` (random access over ArrayRecord, no TensorFlow needed). The
  data set must be prepared in `data_dir` (ArrayRecord format), e.g. once with
  `tfds build cifar10 --file_format=array_record` or
  `tfds.builder(name).download_and_prepare(file_format='array_record')`.
  """
  import tensorflow_datasets as tfds  # Imported lazily: heavy, and optional offline.
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses.
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"unknown tensorflow-datasets data set {name!r} ({first_line[:200]}); "
                     "check the name with `tfds.list_builders()`.") from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"data set {name!r} has no 'image' and 'label' features; "
                     "fsp_jax trains image classifiers.")
  num_classes = features["label"].num_classes
  arrays = []
  for split in (train_split, test_split):
    arrays += _read_tfds_split(tfds, name, split, data_dir)
  return _finish(f"tfds:{name}", *arrays, num_classes)


def _read_tfds_split(tfds, name, split, data_dir):
  """`[images uint8 (N, H, W, C), labels int32 (N,)]` of one split.

  Prefers `tfds.data_source` (ArrayRecord, no TensorFlow). A data set prepared in the
  default TFRecord format (what `tfds.load` writes) is read through `tfds.load` where
  TensorFlow is installed.
  """
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # Not prepared as ArrayRecord, or not prepared at all.
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      raise ValueError(
          f"tensorflow-datasets {name!r} split {split!r} cannot be read ({e}). Prepare "
          f"it once as ArrayRecord: `pip install tensorflow && tfds build {name} "
          "--file_format=array_record`, or use an image folder (data.source='folder')."
      ) from None
    ds = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
    return [np.asarray(ds["image"], np.uint8), np.asarray(ds["label"], np.int32)]
  n = len(source)
  first = source[0]
  images = np.empty((n,) + tuple(np.asarray(first["image"]).shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for k in range(n):
    record = source[k] if k else first
    images[k] = record["image"]
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
    raise ValueError(f"{path} is not a readable image ({e}); remove it from the image "
                     "folder or replace it.") from None


_FOLDER_CACHE = {}


def load_image_folder(root: str, image_size: Optional[Tuple[int, int]] = None,
                      num_workers: int = 8) -> Dataset:
  """Loads `ROOT/train/<class>/*` and `ROOT/test/<class>/*` (JPEG or PNG) into memory.

  Classes are the sub-folder names in sorted order (the same in both splits).
  `image_size` `(H, W)` resizes every image; without it all images must share a size.
  Decoded folders are kept for the process's lifetime (several pipelines in one
  process, e.g. `fsp_jax.reproduce`, decode once).
  """
  key = (os.path.abspath(root), tuple(image_size) if image_size else None)
  if key not in _FOLDER_CACHE:
    _FOLDER_CACHE[key] = _load_image_folder(root, image_size, num_workers)
  return _FOLDER_CACHE[key]


def _load_image_folder(root, image_size, num_workers) -> Dataset:
  if not os.path.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist; expected ROOT/train/<class>/ "
                     "and ROOT/test/<class>/ sub-folders.")
  splits = {}
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise ValueError(f"image folder {root!r} has no {split!r} split: expected "
                       f"{split_dir}/<class>/<image files>.")
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
      raise ValueError(f"{split_dir} has no class sub-folders; expected "
                       f"{split_dir}/<class>/<image files>.")
    files, labels = [], []
    for label, cls in enumerate(classes):
      names = sorted(f for f in os.listdir(os.path.join(split_dir, cls))
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not names:
        raise ValueError(f"class folder {os.path.join(split_dir, cls)} holds no "
                         f"{'/'.join(IMAGE_EXTENSIONS)} image; remove it or add images.")
      files += [os.path.join(split_dir, cls, f) for f in names]
      labels += [label] * len(names)
    splits[split] = (classes, files, labels)
  if splits["train"][0] != splits["test"][0]:
    raise ValueError(f"image folder {root!r}: train classes {splits['train'][0]} differ "
                     f"from test classes {splits['test'][0]}.")
  arrays = []
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for split in ("train", "test"):
      _, files, labels = splits[split]
      images = list(pool.map(lambda p: _decode_image(p, image_size), files,
                             chunksize=256))
      shapes = {im.shape for im in images}
      if len(shapes) > 1:
        raise ValueError(f"images in {root}/{split} have different sizes {sorted(shapes)[:4]}"
                         "; set the data set's image_size to resize them.")
      arrays += [np.stack(images), np.asarray(labels)]
  return _finish(f"folder:{root}", *arrays, len(splits["train"][0]))


def load_digits(image_size: int = 16, test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes).

  Needs no download: the quickstart's data. Pixels (0-16) are scaled to 0-255 and the
  images upsampled to `image_size` (a multiple of 8) with nearest-neighbour. The
  train/test split is fixed (stratified by position within each class).
  """
  from sklearn.datasets import load_digits as sk_load_digits
  if image_size % 8:
    raise ValueError(f"digits image_size must be a multiple of 8; got {image_size}.")
  digits = sk_load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  factor = image_size // 8
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)[..., None]
  labels = digits.target.astype(np.int32)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    is_test[idx[:int(round(len(idx) * test_fraction))]] = True
  return _finish("sklearn:digits", images[~is_test], labels[~is_test], images[is_test],
                 labels[is_test], 10)


def load_dataset(config) -> Dataset:
  """Loads the data set a config's `data` block names (source: tfds, folder, digits)."""
  source = config.source
  if source == "tfds":
    return load_tfds(config.name, config.get("data_dir") or None)
  if source == "folder":
    size = tuple(config.image_size) if config.get("image_size") else None
    return load_image_folder(config.root, size)
  if source == "digits":
    size = tuple(config.get("image_size") or (16, 16))
    if size[0] != size[1]:
      raise ValueError(f"digits images are square; got image_size {size}.")
    return load_digits(size[0])
  raise ValueError(f"unknown data source {source!r}; use 'tfds', 'folder' or 'digits'.")


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


def train_batch_indices(num_examples: int, batch_size: int, seed: int,
                        step: int) -> np.ndarray:
  """Example indices of the global training batch at `step` `(batch_size,)`.

  Epoch e is a permutation drawn from `(seed, e)`; the last partial batch of an epoch is
  dropped. Depends only on `(seed, step)`, never on how often the process restarted.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training "
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
  if augment:
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
    raise ValueError(f"batch_size {batch_size} must be divisible by the number of "
                     f"devices ({mesh.devices.size}).")

  def host_batches():
    for step in range(start_step, num_steps):
      yield step, train_batch(dataset, batch_size, seed, step, augment=augment, pad=pad,
                              flip=flip, process_index=pindex, process_count=pcount,
                              extras=extras)

  for step, batch in prefetch(host_batches(), prefetch_size):
    yield step, to_global(batch, mesh)


def eval_batches(images: np.ndarray, labels: np.ndarray, mesh, batch_size: int):
  """Yields global test batches covering every example once.

  The last batch is padded with zeros to `batch_size`; `'mask'` (float32 `(B,)`) is 1
  for real examples and 0 for padding, so no example is dropped or counted twice.
  """
  pcount, pindex = jax.process_count(), jax.process_index()
  if batch_size % mesh.devices.size:
    raise ValueError(f"eval batch_size {batch_size} must be divisible by the number of "
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
