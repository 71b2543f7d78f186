"""Example (a): a ResNet teacher from the package -> a plain CNN student of your own
(Flax Linen), FSP against training from scratch, on CIFAR-10 (docs/own_models.md).

The student is an ordinary Linen model: no residual connections, no feature outputs,
nothing fsp_jax-specific. Its features are the outputs of four named submodules,
`('stem', 'block1', 'block2', 'block3')`, taken by layer path; the teacher's
`('stem', 'section1', 'section2', 'section3')` pair with them by position.

    python examples/cnn_linen.py --data_root /tmp/cifar10          # 3 seeds
    # the same from the command line, one seed:
    python -m fsp_jax.main --config default --workdir runs/cnn \\
        --config.student.model=examples.cnn_linen:SmallCNN \\
        --config.student.features="('stem','block1','block2','block3')" ...
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

# He initialisation (fan-out), as the package's ResNets; the NNX twin uses the same.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nn.Module):
  """conv3x3 (no bias) - batch norm - ReLU. `(B, H, W, C)` in and out."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False,
                kernel_init=conv_init, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name="bn")(x)
    return nn.relu(x)


class Block(nn.Module):
  """Two ConvBN layers, the first with `strides` (a VGG-style stage, no shortcut)."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = ConvBN(self.features, self.strides, name="conv_bn1")(x, train)
    return ConvBN(self.features, name="conv_bn2")(x, train)


class SmallCNN(nn.Module):
  """stem (16) - block1 (16) - block2 (32, /2) - block3 (64, /2) - mean - dense.

  Returns the logits `(B, num_classes)`, as any classifier; fsp_jax reads its features
  by layer path.
  """
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = ConvBN(self.widths[0], name="stem")(x, train)
    for k, width in enumerate(self.widths):
      x = Block(width, 1 if k == 0 else 2, name=f"block{k + 1}")(x, train)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


FEATURES = ("stem", "block1", "block2", "block3")


def main(argv=None):
  from examples import common
  args = common.parse_args(argv, default_name="cnn_linen")
  common.run_example(args, student="examples.cnn_linen:SmallCNN", features=FEATURES,
                     title="(a) package ResNet teacher -> Linen SmallCNN student")


if __name__ == "__main__":
  main()
