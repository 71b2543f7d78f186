"""Example (b): the student of example (a), written in Flax NNX.

Layer for layer the same network as `examples.cnn_linen.SmallCNN`, with the same
parameter names (`stem/conv/kernel`, `block2/conv_bn1/bn/scale`, ...), so the two
load each other's weights as they are and compute the same features
(tests/test_capture.py checks it). NNX models are given by class, called with
`num_classes=` and `rngs=`; fsp_jax trains them through `train()`/`eval()` and
split/merge inside the same jitted steps as Linen models.

    python examples/cnn_nnx.py --data_root /tmp/cifar10
"""
from typing import Sequence

from flax import nnx
import jax.numpy as jnp

conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
  """conv3x3 (no bias) - batch norm - ReLU. `(B, H, W, C)` in and out."""

  def __init__(self, in_features: int, features: int, strides: int = 1, *,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, features, (3, 3), strides=strides, use_bias=False,
                         kernel_init=conv_init, rngs=rngs)
    self.bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


class Block(nnx.Module):
  """Two ConvBN layers, the first with `strides`."""

  def __init__(self, in_features: int, features: int, strides: int = 1, *,
               rngs: nnx.Rngs):
    self.conv_bn1 = ConvBN(in_features, features, strides, rngs=rngs)
    self.conv_bn2 = ConvBN(features, features, rngs=rngs)

  def __call__(self, x):
    return self.conv_bn2(self.conv_bn1(x))


class SmallCNN(nnx.Module):
  """stem (16) - block1 (16) - block2 (32, /2) - block3 (64, /2) - mean - linear."""

  def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
               in_features: int = 3, *, rngs: nnx.Rngs):
    self.stem = ConvBN(in_features, widths[0], rngs=rngs)
    self.block1 = Block(widths[0], widths[0], 1, rngs=rngs)
    self.block2 = Block(widths[0], widths[1], 2, rngs=rngs)
    self.block3 = Block(widths[1], widths[2], 2, rngs=rngs)
    self.head = nnx.Linear(widths[2], num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.block3(self.block2(self.block1(self.stem(x))))
    return self.head(jnp.mean(x, axis=(1, 2)))


FEATURES = ("stem", "block1", "block2", "block3")


def main(argv=None):
  from examples import common
  args = common.parse_args(argv, default_name="cnn_nnx")
  common.run_example(args, student="examples.cnn_nnx:SmallCNN", features=FEATURES,
                     title="(b) package ResNet teacher -> NNX SmallCNN student")


if __name__ == "__main__":
  main()
