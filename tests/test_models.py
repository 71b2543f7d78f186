"""Model presets: feature names and shapes, logits, exact parameter counts; Network."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsp_jax import models
from fsp_jax.models import init_variables

CIFAR_NAMES = ("stem", "section1", "section2", "section3")
IMAGENET_NAMES = CIFAR_NAMES + ("section4",)


def _shapes(model, image_shape, batch=2):
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0),
                                                    image_shape))
  x = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32)
  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, logits, feats


def _feature_shapes(model, feats):
  """Shapes in network order; the dict holds exactly the model's feature names."""
  assert set(feats) == set(model.feature_names)
  return [feats[name].shape for name in model.feature_names]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 32, 56, 110])
@pytest.mark.parametrize("width", [1, 4])
def test_cifar_resnet_features(depth, width):
  model = models.create_model(f"cifar_resnet{depth}", num_classes=100,
                              width_multiplier=width)
  assert model.modules_per_section == ((depth - 2) // 6,) * 3
  assert model.feature_names == CIFAR_NAMES
  _, logits, feats = _shapes(model, (32, 32, 3))
  assert logits.shape == (2, 100)
  w = 16 * width
  assert _feature_shapes(model, feats) == [(2, 32, 32, w), (2, 32, 32, w),
                                           (2, 16, 16, 2 * w), (2, 8, 8, 4 * w)]


@pytest.mark.parametrize("name,modules", [("resnet18", (2, 2, 2, 2)),
                                          ("resnet34", (3, 4, 6, 3)),
                                          ("resnet20_transfer", (2, 2, 3, 2))])
def test_imagenet_resnet_features(name, modules):
  model = models.create_model(name, num_classes=200)
  assert tuple(model.modules_per_section) == modules
  assert model.feature_names == IMAGENET_NAMES
  _, logits, feats = _shapes(model, (224, 224, 3), batch=1)
  assert logits.shape == (1, 200)
  assert _feature_shapes(model, feats) == [(1, 56, 56, 64), (1, 56, 56, 64),
                                           (1, 28, 28, 128), (1, 14, 14, 256),
                                           (1, 7, 7, 512)]
  # A 32x32 input: stride-2 stem conv and max-pool (8x8), then /2 per section.
  _, _, feats = _shapes(model, (32, 32, 3), batch=1)
  assert _feature_shapes(model, feats) == [(1, 8, 8, 64), (1, 8, 8, 64), (1, 4, 4, 128),
                                           (1, 2, 2, 256), (1, 1, 1, 512)]


def _cifar_count(n, classes, widths=(16, 32, 64)):
  """Parameters of a CIFAR ResNet from its architecture (no biases but BN's and the
  classifier's; BN has a scale and a bias per channel)."""
  bn = lambda c: 2 * c  # noqa: E731
  conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
  total = bn(3) + conv(3, 3, widths[0]) + bn(widths[0])  # bn_input, stem conv, stem BN
  c_in = widths[0]
  for w in widths:
    for m in range(n):
      total += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
      if c_in != w:  # 1x1 projection shortcut where width and resolution change.
        total += conv(1, c_in, w) + bn(w)
      c_in = w
  return total + widths[-1] * classes + classes  # classifier


def test_parameter_counts_are_exact():
  def count(name, classes=10, image_shape=(32, 32, 3)):
    model = models.create_model(name, classes)
    variables, _, _ = _shapes(model, image_shape)
    return _count(variables["params"]), _count(variables["batch_stats"])

  # cifar_resnet8 (n = 1) written out:
  resnet8 = (2 * 3 + 3 * 3 * 3 * 16 + 2 * 16                      # bn_input, stem conv, BN
             + (3 * 3 * 16 * 16 + 2 * 16) * 2                      # section 1: 16 -> 16
             + 3 * 3 * 16 * 32 + 2 * 32 + 3 * 3 * 32 * 32 + 2 * 32  # section 2: 16 -> 32
             + 1 * 1 * 16 * 32 + 2 * 32                            #   projection shortcut
             + 3 * 3 * 32 * 64 + 2 * 64 + 3 * 3 * 64 * 64 + 2 * 64  # section 3: 32 -> 64
             + 1 * 1 * 32 * 64 + 2 * 64                            #   projection shortcut
             + 64 * 10 + 10)                                       # classifier
  assert resnet8 == _cifar_count(1, 10) == 78_048
  # Running mean and variance of every BN: 3 + 16 + 2*16 + 3*32 + 3*64 channels.
  assert count("cifar_resnet8") == (78_048, 2 * (3 + 16 + 2 * 16 + 3 * 32 + 3 * 64))
  assert count("cifar_resnet8", 100)[0] == _cifar_count(1, 100) == 83_898
  assert count("cifar_resnet14")[0] == _cifar_count(2, 10) == 175_264
  # PAPER.md's ResNet-26 (~367K at widths 16-32-64).
  assert count("cifar_resnet26")[0] == _cifar_count(4, 10) == 369_696
  # torchvision's resnet18 and resnet34 with 1000 classes (no input BN).
  assert count("resnet18", 1000, (64, 64, 3))[0] == 11_689_512
  assert count("resnet34", 1000, (64, 64, 3))[0] == 21_797_672
  assert count("resnet20_transfer", 200, (64, 64, 3))[0] == 12_459_784


def test_bad_model_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model"):
    models.create_model("cifar_resnet27", 10)
  with pytest.raises(ValueError, match="6n\\+2"):
    models.cifar_resnet(27)


def test_real_forward_pass_in_both_modes():
  model = models.create_model("cifar_resnet8", 10)
  variables = init_variables(model, jax.random.PRNGKey(0), (16, 16, 3))
  assert set(variables) == {"params", "batch_stats"}
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  logits, feats = model.apply(variables, x, train=False)
  assert logits.shape == (4, 10) and tuple(feats) == CIFAR_NAMES
  # Features are post-ReLU.
  assert all(float(f.min()) >= 0.0 for f in feats.values())
  (logits_t, feats_t), updates = model.apply(variables, x, train=True,
                                             mutable=["batch_stats"])
  assert logits_t.shape == (4, 10) and "batch_stats" in updates
  assert set(feats_t) == set(CIFAR_NAMES)


def test_network_normalises_uint8_images_itself():
  model = models.create_model("cifar_resnet8", 10)
  mean, std = (100.0, 120.0, 140.0), (50.0, 60.0, 70.0)
  net = models.Network(model, mean, std)
  # Hashable and compared by value: one jitted step per network.
  assert hash(net) == hash(models.Network(model, mean, std))
  assert net == models.Network(model, mean, std) and net != models.Network(model, mean,
                                                                           (1.0,) * 3)
  assert net.feature_names == CIFAR_NAMES and net.num_classes == 10
  variables = net.init(jax.random.PRNGKey(0), (16, 16, 3))
  jax.tree.map(np.testing.assert_array_equal, variables,
               init_variables(model, jax.random.PRNGKey(0), (16, 16, 3)))
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  np.testing.assert_allclose(net.normalize(jnp.asarray(images)), x, rtol=1e-6)
  # Inference mode: (logits, features).
  logits, feats = net.apply(variables, images)
  want_logits, want_feats = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               feats, want_feats)
  # Training mode: ((logits, features), new batch statistics).
  (logits_t, feats_t), stats = net.apply(variables, images, train=True)
  (want_t, want_feats_t), updates = model.apply(variables, x, train=True,
                                                mutable=["batch_stats"])
  np.testing.assert_allclose(logits_t, want_t, rtol=1e-5, atol=1e-6)
  assert set(feats_t) == set(CIFAR_NAMES)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats, updates["batch_stats"])
  assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
  # Batch statistics differ from the running ones: the two modes differ.
  assert not np.allclose(logits_t, logits)


@pytest.mark.parametrize("depth", [8, 26])
def test_stride2_convolutions_are_centred_on_the_shortcuts_pixels(depth):
  """The first 3x3 convolution of sections 2 and 3 pads (1, 1) (Caffe, PyTorch): with a
  centre-tap identity kernel its output at (i, j) is its input at (2i, 2j), the pixel
  the 1x1 stride-2 shortcut samples. "SAME" padding, (0, 1) here, gives (2i+1, 2j+1)."""
  model = models.create_model(f"cifar_resnet{depth}", 10)
  variables = init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
  params = jax.tree.map(lambda v: v, variables["params"])
  for s in (2, 3):
    module = dict(params[f"section{s}_module1"])
    for name, centre in (("conv1", 1), ("shortcut_conv", 0)):
      kernel = np.zeros(module[name]["kernel"].shape, np.float32)
      cin = kernel.shape[2]
      kernel[centre, centre, np.arange(cin), np.arange(cin)] = 1.0
      module[name] = {"kernel": jnp.asarray(kernel)}
    params[f"section{s}_module1"] = module
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  (_, feats), state = model.apply({**variables, "params": params}, x, train=False,
                                  capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  for s in (2, 3):
    inputs = feats[f"section{s - 1}"]  # (B, H, W, C): the module's input.
    cin = inputs.shape[-1]
    module = inter[f"section{s}_module1"]
    conv1 = module["conv1"]["__call__"][0][..., :cin]
    shortcut = module["shortcut_conv"]["__call__"][0][..., :cin]
    sampled = inputs[:, ::2, ::2, :]
    assert conv1.shape == sampled.shape
    np.testing.assert_allclose(shortcut, sampled, atol=1e-6)
    np.testing.assert_allclose(conv1, sampled, atol=1e-6)
    # One pixel off is far off (the test can fail).
    assert float(jnp.abs(conv1 - inputs[:, 1::2, 1::2, :]).max()) > 0.1
