"""Data sources: tensorflow-datasets, image folders and scikit-learn's bundled digits,
loaded whole into host memory as uint8 arrays (`Dataset`), and the parts of a data set
(`select` classes and examples, `with_crop`, a fixed `test_split` subset).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from fsp_jax.data.augment import center_crop
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
      test images are already center-cropped to it, and training batches are
      random-resized crops (or center crops) of this size, through the `Augment` their
      pipeline is given (`Augment.of(config.data, enabled, crop_size=crop_size)`).
      None: images are used as they are.
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

