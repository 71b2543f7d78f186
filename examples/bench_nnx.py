"""How fast an NNX student trains through fsp_jax's jitted steps (split/merge inside
`jax.jit`) against its Linen twin in the same steps, and against NNX's own idiom
(`nnx.jit` over a step on the model and an `nnx.Optimizer`).

    python -m examples.bench_nnx            # batch 128, 32x32 images, CPU or GPU

Each variant runs the same SGD step of the same network (examples.cnn_linen.SmallCNN
and examples.cnn_nnx.SmallCNN, cross-entropy); the variants take turns, and the best
of the rounds is reported (the least disturbed by other work on the machine).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import cnn_linen, cnn_nnx
from fsp_jax import models, train

MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def fsp_jax_step(network, batch):
  """The pipeline's step (train.jit_train_step) for `network`."""
  variables = network.init(jax.random.PRNGKey(0), batch["image"].shape[1:])
  state = train.create_train_state(network, variables, optax.sgd(0.05, momentum=0.9))
  step = train.jit_train_step(network)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]
  return run


def nnx_native_step(batch):
  """NNX's own way: `nnx.jit` of a step that updates the model and optimizer in place."""
  model = cnn_nnx.SmallCNN(10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
  mean, std = jnp.asarray(MEAN), jnp.asarray(STD)

  @nnx.jit
  def step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model((images.astype(jnp.float32) - mean) / std)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model.train()
  return lambda: step(model, optimizer, batch["image"], batch["label"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="Steps per round.")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (args.batch_size, 32, 32, 3)),
                                jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)}
  variants = {
      "Linen SmallCNN, fsp_jax step": fsp_jax_step(models.Network(
          cnn_linen.SmallCNN(10), MEAN, STD, layers=cnn_linen.FEATURES, classes=10),
          batch),
      "NNX SmallCNN, fsp_jax step (split/merge in jax.jit)": fsp_jax_step(
          models.Network(models.NnxModel(cnn_nnx.SmallCNN, 10), MEAN, STD,
                         layers=cnn_nnx.FEATURES, classes=10), batch),
      "NNX SmallCNN, nnx.jit + nnx.Optimizer": nnx_native_step(batch),
  }
  for run in variants.values():  # Compile.
    jax.block_until_ready(run())
  best = {name: float("inf") for name in variants}
  for _ in range(args.rounds):
    for name, run in variants.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        loss = run()
      jax.block_until_ready(loss)
      best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
  print(f"{jax.devices()[0].platform}, batch {args.batch_size}, best of {args.rounds} "
        f"rounds of {args.steps} steps:")
  for name, seconds in best.items():
    print(f"  {name:55s} {1000 * seconds:7.1f} ms/step "
          f"{args.batch_size / seconds:7.0f} img/s")


if __name__ == "__main__":
  main()
