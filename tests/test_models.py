"""Model presets: section feature shapes, logits, parameter counts."""
import jax
import jax.numpy as jnp
import pytest

from fsp_jax import models
from fsp_jax.train import init_variables


def _shapes(model, image_shape, batch=2):
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0),
                                                    image_shape))
  x = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32)
  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, logits, feats


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 32, 56, 110])
@pytest.mark.parametrize("width", [1, 4])
def test_cifar_resnet_features(depth, width):
  model = models.create_model(f"cifar_resnet{depth}", num_classes=100,
                              width_multiplier=width)
  assert model.modules_per_section == ((depth - 2) // 6,) * 3
  _, logits, feats = _shapes(model, (32, 32, 3))
  assert logits.shape == (2, 100)
  w = 16 * width
  assert [f.shape for f in feats] == [(2, 32, 32, w), (2, 32, 32, w),
                                      (2, 16, 16, 2 * w), (2, 8, 8, 4 * w)]


@pytest.mark.parametrize("name,modules", [("resnet18", (2, 2, 2, 2)),
                                          ("resnet34", (3, 4, 6, 3)),
                                          ("resnet20_transfer", (2, 2, 3, 2))])
def test_imagenet_resnet_features(name, modules):
  model = models.create_model(name, num_classes=200)
  assert tuple(model.modules_per_section) == modules
  _, logits, feats = _shapes(model, (224, 224, 3), batch=1)
  assert logits.shape == (1, 200)
  assert [f.shape for f in feats] == [(1, 56, 56, 64), (1, 56, 56, 64), (1, 28, 28, 128),
                                      (1, 14, 14, 256), (1, 7, 7, 512)]


def test_parameter_counts_match_the_paper():
  def count(name):
    variables, _, _ = _shapes(models.create_model(name, 10), (32, 32, 3))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))
  # PAPER.md: roughly 75K (ResNet-8) and 367K (ResNet-26) at widths 16-32-64.
  assert 70_000 < count("cifar_resnet8") < 85_000
  assert 350_000 < count("cifar_resnet26") < 385_000
  # torchvision's resnet34 has 21.8M parameters with 1000 classes.
  variables, _, _ = _shapes(models.create_model("resnet34", 1000), (64, 64, 3))
  assert abs(sum(x.size for x in jax.tree.leaves(variables["params"])) - 21_797_672) < 1000


def test_bad_model_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model"):
    models.create_model("cifar_resnet27", 10)
  with pytest.raises(ValueError, match="6n\\+2"):
    models.cifar_resnet(27)


def test_real_forward_pass_in_both_modes():
  model = models.create_model("cifar_resnet8", 10)
  variables = init_variables(model, jax.random.PRNGKey(0), (16, 16, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  logits, feats = model.apply(variables, x, train=False)
  assert logits.shape == (4, 10) and len(feats) == 4
  # Features are post-ReLU.
  assert all(float(f.min()) >= 0.0 for f in feats)
  (logits_t, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits_t.shape == (4, 10) and "batch_stats" in updates
