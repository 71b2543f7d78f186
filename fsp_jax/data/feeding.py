"""Feeding the devices: the global training batch of each step, sharded over devices
and processes, from the host (`train_batches`, `train_calls`) or gathered on the
devices from a device-resident training set (`device_train_data`,
`device_train_batch`); test batches and per-example maps (`eval_batches`,
`map_examples`).

The batch at step `s` is a pure function of `(seed, s)` (`train_batch_indices`, then
the `Augment` draws of `(seed, s)`), never of how often the process restarted.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fsp_jax.data.augment import Augment, device_augment, host_augment
from fsp_jax.data.sources import Dataset
from fsp_jax.validation import ConfigError, check_batch_size


def train_batch_indices(num_examples: int, batch_size: int, seed: int,
                        step: int) -> np.ndarray:
  """Example indices of the global training batch at `step` `(batch_size,)`.

  Epoch e is a permutation drawn from `(seed, e)`; the last partial batch of an epoch is
  dropped. Depends only on `(seed, step)`, never on how often the process restarted.
  """
  check_batch_size(batch_size, 1, num_examples)
  steps_per_epoch = num_examples // batch_size
  epoch, k = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[k * batch_size:(k + 1) * batch_size]


def _check_crop(dataset: Dataset, augment: Augment) -> None:
  """Fails where `dataset`'s test images are centre-cropped (`with_crop`) but
  `augment` would not crop its training images to the same size."""
  if dataset.crop_size and tuple(dataset.crop_size) != augment.crop_size:
    raise ConfigError(
        f"{dataset.name} is tested on {tuple(dataset.crop_size)} crops but the "
        f"training batches' Augment has crop_size {augment.crop_size}; build it with "
        "Augment.of(config.data, enabled, crop_size=dataset.crop_size).")


def train_batch(dataset: Dataset, batch_size: int, seed: int, step: int,
                augment: Augment = Augment(), process_index: int = 0,
                process_count: int = 1, extras=None):
  """This process's part of the global training batch at `step`, augmented by
  `augment` (`host_augment`; its `crop_size` must be the data set's).

  Returns `{'image': uint8 (B/P, H', W', C), 'label': int32 (B/P,)}` where P is the
  number of processes and `(H', W')` the `crop_size` where given, else the images'
  size: each process reads and augments only its own slice. `extras` (`{name: array
  or tuple of arrays}`, each `(N, ...)` per training example, e.g. the teacher's
  cached FSP matrices) are gathered for the same examples under `name`.
  """
  _check_crop(dataset, augment)
  idx = train_batch_indices(len(dataset.train_labels), batch_size, seed, step)
  local = batch_size // process_count
  lo = process_index * local
  sl = slice(lo, lo + local)
  images = host_augment(dataset.train_images[idx], augment, seed, step, sl)
  batch = {"image": images, "label": dataset.train_labels[idx][sl]}
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
                  num_steps: int, augment: Augment = Augment(), prefetch_size: int = 2,
                  extras=None) -> Iterator:
  """Yields `(step, global_batch)` for steps `start_step .. num_steps-1`, each batch
  `train_batch`'s (augmented by `augment`) assembled over the processes and sharded
  over `mesh` along B.

  `extras`: per-example host arrays gathered into each batch (see `train_batch`).
  """
  pcount, pindex = jax.process_count(), jax.process_index()
  check_batch_size(batch_size, mesh.devices.size, len(dataset.train_labels))
  _check_crop(dataset, augment)

  def host_batches():
    for step in range(start_step, num_steps):
      yield step, train_batch(dataset, batch_size, seed, step, augment,
                              process_index=pindex, process_count=pcount,
                              extras=extras)

  for step, batch in prefetch(host_batches(), prefetch_size):
    yield step, to_global(batch, mesh)


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
                augment: Augment = Augment(), prefetch_size: int = 2,
                extras=None) -> Iterator:
  """Yields `(lo, hi, inputs)` for each call range, what `train.jit_train_steps` takes.

  Host pipeline (`device=False`): `inputs` is the batches of steps lo..hi-1, uint8
  images `(K, [S,] B, H, W, C)` and labels `(K, [S,] B)` (K = hi - lo; the seed axis S
  only where there are several seeds, seed k's batches drawn with its seed), sharded
  over the mesh along B, augmented by `augment` (`train_batch`). Device pipeline:
  `inputs` holds only `indices` `(K, [S,] B)` int32, `seed` and `step` `(K, [S])`: the
  batches are gathered and augmented on the device (`device_train_batch`, given its
  own `Augment`; `augment` is unused here). Both are pure functions of (seed, step).

  `extras` (`{name: array or tuple of arrays}`, each `(N, ...)` per training example,
  e.g. the teacher's cached FSP matrices) are gathered on the host for the examples of
  each seed's batch, in either pipeline: `inputs[name]` `(K, [S,] B, ...)`.
  """
  pcount = jax.process_count()
  check_batch_size(batch_size, mesh.devices.size, len(dataset.train_labels))
  if not device:
    _check_crop(dataset, augment)
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
        batches = [train_batch(dataset, batch_size, s, step, augment,
                               process_index=pindex, process_count=pcount,
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
  check_batch_size(batch_size, mesh.devices.size, field="eval_batch_size")
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


# ---- the device-resident pipeline ---------------------------------------------------
# The training images live on the device(s); a step's batch is gathered there by its
# example indices (`train_batch_indices`, the host pipeline's) and augmented by jitted
# ops keyed by `(seed, step)` (`device_augment`): still a pure function of
# `(seed, step)`, so resuming stays exact. The random draws differ from the host
# pipeline's (NumPy), so the two pipelines give different (equally valid)
# augmentations.


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
                       seed, step, augment: Augment = Augment(), mesh=None):
  """The training batch of `indices` `(B,)` from device-resident `images` uint8
  `(N, H, W, C)` and `labels` `(N,)`, augmented by `augment` keyed by
  `augment_key(seed, step)` (`device_augment`): `{'image': uint8 (B, H', W', C),
  'label': (B,)}`, `(H', W')` the `crop_size` where given. Jittable (`augment` and
  `mesh` static); the images stay on the device. With `mesh`, `images` and `labels`
  are sharded over it by examples (`device_train_data`) and gathered by
  `take_rows`."""
  if mesh is not None:
    batch_images, batch_labels = (take_rows(images, indices, mesh),
                                  take_rows(labels, indices, mesh))
  else:
    batch_images = jnp.take(images, indices, axis=0)
    batch_labels = jnp.take(labels, indices, axis=0)
  return {"image": device_augment(batch_images, augment, seed, step),
          "label": batch_labels}
