"""Data sources, augmentation, deterministic batches, padded evaluation."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from fsp_jax import data


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(8, 8), ext="png"):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in classes:
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for k in range(per_class):
        img = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{k}.{ext}"))
  return str(root)


def test_image_folder_loads_both_splits(tmp_path):
  root = _write_folder(tmp_path)
  ds = data.load_image_folder(root)
  assert ds.train_images.shape == (6, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert ds.num_classes == 2 and sorted(set(ds.test_labels)) == [0, 1]
  resized = data.load_image_folder(root, image_size=(16, 12))
  assert resized.test_images.shape == (6, 16, 12, 3)


@pytest.mark.parametrize("breakage,message", [
    ("missing_split", "no 'test' split: expected"),
    ("empty_class", "holds no .jpg/.jpeg/.png image; remove it or add images"),
    ("not_an_image", "not a readable image"),
])
def test_image_folder_errors_name_the_problem(tmp_path, breakage, message):
  root = _write_folder(tmp_path)
  if breakage == "missing_split":
    import shutil
    shutil.rmtree(os.path.join(root, "test"))
  elif breakage == "empty_class":
    os.makedirs(os.path.join(root, "train", "zebra"))
  else:
    with open(os.path.join(root, "train", "cat", "broken.jpg"), "w") as f:
      f.write("not a jpeg")
  with pytest.raises(ValueError) as error:
    data.load_image_folder(root)
  # One line naming the problem and the fix (the CLI prints it as
  # `fsp_jax: error: ...`).
  assert message in str(error.value) and "\n" not in str(error.value)
  if breakage == "not_an_image":
    assert "broken.jpg" in str(error.value) and "remove it" in str(error.value)


def test_digits_is_real_bundled_data():
  ds = data.load_digits(16)
  assert ds.train_images.shape[1:] == (16, 16, 1)
  assert len(ds.train_labels) + len(ds.test_labels) == 1797
  assert ds.num_classes == 10 and ds.train_images.max() == 255


def test_tfds_source_under_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_tfds("cifar10")
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.num_classes == 10
  with pytest.raises(ValueError, match="unknown tensorflow-datasets"):
    data.load_tfds("no_such_dataset_xyz")


def test_cub_200_from_tfds_resized_and_cropped():
  """caltech_birds2011 (CUB-200-2011) has images of many sizes: resized on loading,
  random-resized crops in training, center crops for testing."""
  import ml_collections
  import tensorflow_datasets as tfds
  config = ml_collections.ConfigDict(dict(source="tfds", name="caltech_birds2011",
                                          data_dir="", image_size=(20, 24),
                                          crop_size=(16, 16)))
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(ValueError, match="image_size"):
      data.load_tfds("caltech_birds2011")
    ds = data.load_dataset(config)
  assert ds.num_classes == 200 and ds.crop_size == (16, 16)
  assert ds.train_images.shape == (8, 20, 24, 3) and ds.test_images.shape == (8, 16, 16, 3)
  assert ds.image_shape == (16, 16, 3)
  augment = data.Augment(flip=True, crop_size=ds.crop_size)
  batch = data.train_batch(ds, 4, seed=0, step=1, augment=augment)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"],
                                data.train_batch(ds, 4, seed=0, step=1,
                                                 augment=augment)["image"])
  # Each process crops its own half; together they are the global batch.
  halves = [data.train_batch(ds, 4, 0, 1, augment, process_index=p, process_count=2)
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                batch["image"])
  plain = data.train_batch(ds, 4, seed=0, step=1,
                           augment=data.Augment.none(crop_size=ds.crop_size))
  np.testing.assert_array_equal(plain["image"],
                                data.center_crop(ds.train_images[
                                    data.train_batch_indices(8, 4, 0, 1)], (16, 16)))


def test_random_resized_crop_covers_scales_and_flips():
  image = np.arange(32 * 32, dtype=np.uint8).reshape(1, 32, 32, 1) % 251
  rngs = [np.random.default_rng(k) for k in range(40)]
  out = data.random_resized_crop(np.repeat(image, 40, 0), rngs, (8, 8), flip=True)
  assert out.shape == (40, 8, 8, 1)
  assert len({o.tobytes() for o in out}) == 40
  # The whole image as the window (scale 1, ratio 1) is a plain resize.
  full = data.random_resized_crop(image, [np.random.default_rng(0)], (16, 16),
                                  scale=(1.0, 1.0), ratio=(1.0, 1.0))
  from PIL import Image
  want = np.asarray(Image.fromarray(image[0, ..., 0]).resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(full[0, ..., 0], want)
  with pytest.raises(ValueError, match="crop_size"):
    data.with_crop(data.load_digits(8), (16, 16))


def test_augmentation_is_pad_and_crop():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 8, 8, 3), dtype=np.uint8)
  out = data.augment_batch(images, np.random.default_rng(1), pad=4)
  assert out.shape == images.shape
  # Every output is a shifted window of the zero-padded input.
  for k in range(64):
    padded = np.pad(images[k], ((4, 4), (4, 4), (0, 0)))
    assert any(np.array_equal(out[k], padded[y:y + 8, x:x + 8])
               for y in range(9) for x in range(9))
  assert not np.array_equal(out, images)


def test_train_batches_depend_only_on_seed_and_step():
  ds = data.load_digits(8)
  a = data.train_batch(ds, 32, seed=3, step=57)
  b = data.train_batch(ds, 32, seed=3, step=57)
  c = data.train_batch(ds, 32, seed=4, step=57)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  # One epoch visits distinct examples.
  n = len(ds.train_labels)
  idx = np.concatenate([data.train_batch_indices(n, 32, 0, s) for s in range(n // 32)])
  assert len(set(idx.tolist())) == len(idx)
  # Two processes each read their half of the same global batch.
  halves = [data.train_batch(ds, 32, 3, 57, process_index=p, process_count=2)
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), a["label"])


def test_host_batches_are_the_plain_augmentations_of_seed_and_step():
  """The random draws of a (seed, step) never change: a pipeline change that drew
  otherwise would silently change every run's data (and break resuming old runs)."""
  import hashlib
  ds = data.load_digits(16)
  seed, step, bs = 3, 57, 32
  idx = data.train_batch_indices(len(ds.train_labels), bs, seed, step)
  # Pad-crop-flip: one Generator [seed, step, 1] over the whole global batch.
  batch = data.train_batch(ds, bs, seed, step, data.Augment(pad=4, flip=True))
  assert hashlib.sha256(batch["image"].tobytes()).hexdigest() == (
      "d568f7b38ffcf1cb5879c3401d19f3bc8c3d949daf982b2d28e7ac9f8ceddd62")
  assert hashlib.sha256(batch["label"].tobytes()).hexdigest() == (
      "a3811c9aa4d864a42422a5b2472bb50515bea418da2d1d7dce705f8826ad00b3")
  for pad, flip in ((4, False), (2, True), (0, True)):
    rng = np.random.default_rng([seed, step, 1])
    want = data.augment_batch(ds.train_images[idx], rng, pad=pad, flip=flip)
    for p, count in ((0, 1), (0, 2), (1, 2)):
      got = data.train_batch(ds, bs, seed, step, data.Augment(pad=pad, flip=flip),
                             process_index=p, process_count=count)
      rows = slice(p * bs // count, (p + 1) * bs // count)
      np.testing.assert_array_equal(got["image"], want[rows])
      np.testing.assert_array_equal(got["label"], ds.train_labels[idx][rows])
  np.testing.assert_array_equal(
      data.train_batch(ds, bs, seed, step, data.Augment.none())["image"],
      ds.train_images[idx])
  # Random-resized crops: image k of the global batch from Generator [seed, step, 2, k].
  crop = data.with_crop(ds, (12, 12))
  rngs = [np.random.default_rng([seed, step, 2, k]) for k in range(bs)]
  want = data.random_resized_crop(crop.train_images[idx], rngs, (12, 12), flip=True)
  for p, count in ((0, 1), (1, 2)):
    got = data.train_batch(crop, bs, seed, step,
                           data.Augment(flip=True, crop_size=crop.crop_size),
                           process_index=p, process_count=count)
    np.testing.assert_array_equal(
        got["image"], want[p * bs // count:(p + 1) * bs // count])
  np.testing.assert_array_equal(
      data.train_batch(crop, bs, seed, step,
                       data.Augment.none(crop_size=(12, 12)))["image"],
      data.center_crop(crop.train_images[idx], (12, 12)))
  # Extras come with every kind of batch, random-resized crops included.
  extras = {"row": np.arange(len(ds.train_labels))}
  got = data.train_batch(crop, bs, seed, step, data.Augment(crop_size=(12, 12)),
                         process_index=1, process_count=2, extras=extras)
  np.testing.assert_array_equal(got["row"], idx[bs // 2:])
  # A data set tested on crops is trained on crops of the same size.
  with pytest.raises(ValueError, match=r"crop_size=dataset.crop_size"):
    data.train_batch(crop, bs, seed, step, data.Augment())


def test_device_batches_are_the_plain_device_augmentations():
  ds = data.load_digits(16)
  images, labels = jax.numpy.asarray(ds.train_images), jax.numpy.asarray(ds.train_labels)
  idx = data.train_batch_indices(len(ds.train_labels), 32, 5, 7)
  key = data.augment_key(5, 7)
  plain = images[idx]
  for augment, want in (
      (data.Augment(pad=1, flip=True), data.device_pad_crop_flip(plain, key, 1, True)),
      (data.Augment(flip=True, crop_size=(12, 12)),
       data.device_random_resized_crop(plain, key, (12, 12), flip=True)),
      (data.Augment.none(crop_size=(12, 12)), plain[:, 2:14, 2:14]),
      (data.Augment.none(), plain)):
    got = data.device_train_batch(images, labels, idx, 5, 7, augment)
    np.testing.assert_array_equal(got["image"], want)
    np.testing.assert_array_equal(got["label"], ds.train_labels[idx])


def test_augment_is_hashable_and_a_static_jit_argument():
  import ml_collections
  a = data.Augment(pad=np.int64(2), flip=True, crop_size=[12, np.int32(12)])
  assert a.crop_size == (12, 12) and all(type(s) is int for s in a.crop_size)
  assert type(a.pad) is int
  b = data.Augment(pad=2, flip=True, crop_size=(12, 12))
  assert a == b and hash(a) == hash(b) and len({a, b, data.Augment()}) == 2
  assert data.Augment(crop_size=None).crop_size == ()
  with pytest.raises(AttributeError):
    a.pad = 3  # Frozen.
  config = ml_collections.ConfigDict(dict(pad=2, flip=True))
  assert data.Augment.of(config, True, crop_size=(12, 12)) == b
  assert data.Augment.of(config, False) == data.Augment(False, 2, True, ())
  assert data.Augment.none() == data.Augment(enabled=False)
  with pytest.raises(ValueError, match="crop_size"):
    data.Augment(crop_size=(1, 2, 3))
  with pytest.raises(ValueError, match="pad"):
    data.Augment(pad=-1)
  traces = []

  def fn(images, augment):
    traces.append(augment)
    return data.device_augment(images, augment, 5, 7)
  jitted = jax.jit(fn, static_argnums=1)
  images = jax.numpy.asarray(data.load_digits(16).train_images[:8])
  one = jitted(images, data.Augment(pad=1, flip=True))
  again = jitted(images, data.Augment(pad=np.int64(1), flip=1))  # Equal: no retrace.
  assert len(traces) == 1
  np.testing.assert_array_equal(one, again)
  np.testing.assert_array_equal(
      one, data.device_pad_crop_flip(images, data.augment_key(5, 7), 1, True))
  assert jitted(images, data.Augment.none()).shape == images.shape and len(traces) == 2


def test_batch_sizes_are_checked_once_with_what_to_set():
  ds = data.load_digits(8)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  with pytest.raises(ValueError, match=r"batch_size=5000 exceeds the \d+ training "
                     r"examples; set config.batch_size to at most \d+"):
    data.train_batch_indices(len(ds.train_labels), 5000, 0, 0)
  for call in (lambda: next(data.train_batches(ds, mesh, 5000, 0, 0, 1)),
               lambda: next(data.train_calls(ds, mesh, 5000, (0,), [(0, 1)]))):
    with pytest.raises(ValueError, match="exceeds the"):
      call()
  from fsp_jax import validation
  with pytest.raises(validation.ConfigError) as error:
    validation.check_batch_size(31, 2, 1000, "fsp.schedule.batch_size", stage="fsp")
  assert str(error.value) == (
      "fsp.schedule.batch_size=31 is not divisible by the 2 devices the batch is split "
      "over (stage 'fsp'); set config.fsp.schedule.batch_size=32.")
  assert error.value.field == "fsp.schedule.batch_size"
  with pytest.raises(validation.ConfigError, match="eval_batch_size=30 is not divisible "
                     "by the 4 devices .*; set config.eval_batch_size=32"):
    validation.check_batch_size(30, 4, field="eval_batch_size")
  with pytest.raises(validation.ConfigError, match="set config.batch_size=8"):
    validation.check_batch_size(9, 4, 10)  # 12 would exceed the 10 examples.
  validation.check_batch_size(32, 2, 32)


def test_eval_batches_cover_every_example_once():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
  labels = np.arange(10, dtype=np.int32)
  batches = list(data.eval_batches(images, labels, mesh, batch_size=4))
  assert len(batches) == 3
  masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
  seen = np.concatenate([np.asarray(b["label"]) for b in batches])[masks == 1]
  np.testing.assert_array_equal(seen, labels)
  assert masks.sum() == 10


@pytest.mark.slow
def test_real_cifar10_image_folder(cifar10_folder):
  ds = data.load_image_folder(cifar10_folder)
  assert ds.train_images.shape == (50000, 32, 32, 3)
  assert ds.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_allclose(ds.mean, [125.27, 122.93, 113.86], atol=0.05)


def test_select_keeps_classes_and_few_training_examples():
  ds = data.load_digits(8)
  part = data.select(ds, classes=(7, 2), train_per_class=5)
  assert part.num_classes == 2 and len(part.train_labels) == 10
  np.testing.assert_array_equal(part.train_labels, [0] * 5 + [1] * 5)
  np.testing.assert_array_equal(part.train_images[:5],
                                ds.train_images[np.flatnonzero(ds.train_labels == 7)[:5]])
  assert len(part.test_labels) == np.sum(np.isin(ds.test_labels, (7, 2)))
  np.testing.assert_allclose(part.mean, part.train_images.reshape(-1, 1).mean(0),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="distinct indices"):
    data.select(ds, classes=(3, 10))
  with pytest.raises(ValueError, match="fewer than train_per_class"):
    data.select(ds, classes=(1,), train_per_class=1000)


def test_image_folder_cache_is_read_back_and_keyed_on_the_files(tmp_path):
  from PIL import Image
  root, cache = tmp_path / "folder", tmp_path / "cache"
  rng = np.random.default_rng(0)
  for split, n in (("train", 3), ("test", 2)):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for k in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / split / cls / f"{k}.png")
  first = data._load_image_folder(str(root), None, 2, str(cache))
  files = list(cache.glob("folder-*.npz"))
  assert len(files) == 1
  again = data._load_image_folder(str(root), None, 2, str(cache))
  np.testing.assert_array_equal(again.train_images, first.train_images)
  np.testing.assert_array_equal(again.test_labels, first.test_labels)
  assert again.num_classes == 2
  # Read from the cache, not the images: poison the cached arrays and see them come back.
  with np.load(files[0]) as z:
    arrays = dict(z)
  arrays["train_images"] = np.zeros_like(arrays["train_images"])
  np.savez(files[0], **arrays)
  assert not data._load_image_folder(str(root), None, 2, str(cache)).train_images.any()
  # A changed image is another key: decoded again, from the files.
  Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(root / "train" / "a" / "0.png")
  changed = data._load_image_folder(str(root), None, 2, str(cache))
  assert (changed.train_images[0] == 7).all() and changed.train_images[1:].any()
  assert len(list(cache.glob("folder-*.npz"))) == 2


def test_cache_dir_is_not_part_of_a_stage_fingerprint():
  from fsp_jax import config_lib, stages
  config = config_lib.load("default")
  stage = stages.plan_stages(config)[0]
  before = stages.fingerprint(config, stage, [stage])
  config.data.cache_dir = "/somewhere"
  assert stages.fingerprint(config, stage, [stage]) == before
  config.data.pad = 2  # What changes the data does change it.
  assert stages.fingerprint(config, stage, [stage]) != before


def test_test_split_is_a_fixed_random_subset_or_the_whole_test_set():
  ds = data.load_digits(8)
  n = len(ds.test_labels)
  for examples in (0, n, n + 5):
    images, labels = data.test_split(ds, examples)
    assert images is ds.test_images and labels is ds.test_labels
  images, labels = data.test_split(ds, 50)
  assert images.shape == (50,) + ds.test_images.shape[1:] and labels.shape == (50,)
  again = data.test_split(ds, 50)
  np.testing.assert_array_equal(again[0], images)  # The same subset every call.
  np.testing.assert_array_equal(again[1], labels)
  # Distinct test examples, not a prefix of the test set (stored class by class in
  # some data sets), labels kept with their images.
  flat = ds.test_images.reshape(n, -1)
  rows = [np.flatnonzero((flat == image.reshape(-1)).all(1)) for image in images]
  assert all(len(r) >= 1 for r in rows)
  index = np.asarray([r[0] for r in rows])
  assert len(set(index.tolist())) == 50 and not np.array_equal(index, np.arange(50))
  np.testing.assert_array_equal(ds.test_labels[index], labels)


def test_channel_mean_std_from_histograms_equals_numpys():
  images = np.random.default_rng(0).integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
  images[..., 2] = 9  # A constant channel: std 1, not 0.
  mean, std = data.channel_mean_std(images)
  flat = images.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std[:2], flat.std(0)[:2], rtol=1e-9)
  assert std[2] == 1.0
