"""Data: sources, augmentation, and feeding the devices, each in its own module.

- `sources`: tensorflow-datasets, image folders and a bundled quickstart set
  (scikit-learn's digits) loaded into a `Dataset`, and its parts (`select`,
  `with_crop`, `test_split`).
- `augment`: how training images are augmented (`Augment`, one hashable dataclass) and
  the augmentation itself, on the host (NumPy: the paper's pad-crop-flip,
  random-resized and centre crops) or on the device (jitted ops).
- `feeding`: global training batches sharded over devices and processes, several
  steps and seeds per call, from the host or gathered on the devices; test batches.

Data sets here are small enough to hold in host memory as uint8 arrays (CIFAR: 150 MB),
so the input pipeline is NumPy indexing plus a prefetch thread. The batch at step `s`
is a pure function of `(seed, s)`: a resumed run sees exactly the data an
uninterrupted one would.

Every name is re-exported here: `from fsp_jax import data; data.train_calls(...)`.
"""
from fsp_jax.data.augment import (Augment, augment_batch, augment_key, center_crop,
                                  device_augment, device_pad_crop_flip,
                                  device_random_resized_crop, host_augment,
                                  random_resized_crop)
from fsp_jax.data.feeding import (call_ranges, data_sharding, device_train_batch,
                                  device_train_data, eval_batches, map_examples,
                                  prefetch, take_rows, to_global, train_batch,
                                  train_batch_indices, train_batches, train_calls)
from fsp_jax.data.sources import (IMAGE_EXTENSIONS, Dataset, _load_image_folder,
                                  channel_mean_std, load_dataset, load_digits,
                                  load_image_folder, load_tfds, select, test_split,
                                  with_crop)

__all__ = ["Augment", "augment_batch", "augment_key", "center_crop", "device_augment",
           "device_pad_crop_flip", "device_random_resized_crop", "host_augment",
           "random_resized_crop", "call_ranges", "data_sharding", "device_train_batch",
           "device_train_data", "eval_batches", "map_examples", "prefetch", "take_rows",
           "to_global", "train_batch", "train_batch_indices", "train_batches",
           "train_calls", "IMAGE_EXTENSIONS", "Dataset", "channel_mean_std",
           "load_dataset", "load_digits", "load_image_folder", "load_tfds", "select",
           "test_split", "with_crop"]
