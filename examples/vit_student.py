"""Example (c): a small Vision Transformer student (patch tokens) taught by a CNN
teacher, through 1x1 channel adapters (docs/own_models.md).

The ViT's features are token maps `(B, 1 + 64, 64)`: a class token and 8x8 patch
tokens. The pipeline drops the class token (`student.drop_tokens=1`) and views the 64
patch tokens as an 8x8 grid, so each pairs with the teacher's 32x32, 16x16 and 8x8
maps (those pooled down to 8x8 where a pair mixes sizes). Widths differ (64 against
16/32/64): `fsp.adapter=True` learns a 1x1 map of each student feature to the
teacher's channels.

    python examples/vit_student.py --data_root /tmp/cifar10
"""
import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)). `(B, N, D)`."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attn")(y)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, name="mlp1")(y)
    return x + nn.Dense(x.shape[-1], name="mlp2")(nn.gelu(y))


class ViT(nn.Module):
  """Patch embedding (4x4 patches: 8x8 tokens for 32x32 images), a class token,
  learned position embeddings, `depth` encoder blocks, the class token's logits."""
  num_classes: int = 10
  patch: int = 4
  dim: int = 64
  depth: int = 3
  num_heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No dropout, no batch norm.
    x = nn.Conv(self.dim, (self.patch, self.patch), (self.patch, self.patch),
                padding="VALID", name="patch_embed")(x)  # (B, h, w, D)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d))
    for k in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{k + 1}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


# The patch embedding is a (B, 8, 8, D) map; the blocks' outputs are token maps.
FEATURES = ("patch_embed", "block1", "block2", "block3")


def main(argv=None):
  from examples import common
  args = common.parse_args(argv, default_name="vit_student")
  common.run_example(args, student="examples.vit_student:ViT", features=FEATURES,
                     title="(c) package ResNet teacher -> ViT student (adapters)",
                     overrides={"student.drop_tokens": 1, "fsp.adapter": True})


if __name__ == "__main__":
  main()
