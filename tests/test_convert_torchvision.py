"""torchvision resnet34 (.pth) -> fsp_jax: same logits and section features.

A PyTorch ResNet-34 with torchvision's exact state-dict names, random weights and
random BatchNorm statistics, is saved as a .pth, converted with the command-line entry
point, restored as a teacher checkpoint, and run in inference mode on one input (NCHW
there, NHWC here). Skipped where PyTorch is not installed (`pip install '.[torch]'`).
"""
import jax
import numpy as np
import pytest

from fsp_jax import checkpoints, convert_torchvision, models

torch = pytest.importorskip("torch")
nn = torch.nn


class BasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock (names and arithmetic)."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TorchResNet(nn.Module):
  """torchvision.models.resnet34's layout; forward also returns the section features."""

  def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for s, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
      blocks = [BasicBlock(inplanes if b == 0 else planes, planes,
                           2 if (s > 0 and b == 0) else 1) for b in range(n)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      inplanes = planes
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    features = [x]
    for s in range(1, 5):
      x = getattr(self, f"layer{s}")(x)
      features.append(x)
    return self.fc(torch.flatten(self.avgpool(x), 1)), features


def _randomise_batchnorm(model, generator):
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      c = m.num_features
      with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(c, generator=generator))
        m.bias.copy_(0.1 * torch.randn(c, generator=generator))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(c, generator=generator))


def test_resnet34_state_dict_converts_to_the_same_network(tmp_path):
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(0)
  net = TorchResNet(num_classes=1000)
  _randomise_batchnorm(net, generator)
  net.eval()
  assert "layer2.0.downsample.1.running_var" in net.state_dict()
  assert "layer1.0.downsample.0.weight" not in net.state_dict()
  pth = tmp_path / "resnet34.pth"
  torch.save(net.state_dict(), pth)

  out = tmp_path / "converted"
  assert convert_torchvision.main([str(pth), str(out)]) == 0
  model = models.create_model("resnet34", 1000)
  template = models.init_variables(model, jax.random.PRNGKey(0), (64, 64, 3))
  variables, _ = checkpoints.restore_model(str(out), template, "converted checkpoint")

  # 2 images of 64x64 (sections at 16, 16, 8, 4, 2 pixels; odd sizes are not needed
  # for the padding to matter: stride-2 3x3 convolutions of even maps).
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    t_logits, t_feats = net(torch.from_numpy(x))
  logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, np.transpose(x, (0, 2, 3, 1)))
  scale = float(np.abs(t_logits.numpy()).max())
  np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), rtol=1e-4,
                             atol=1e-4 * scale)
  # Named features: the stem (after the max-pool), then layer1..layer4.
  assert model.feature_names == ("stem", "section1", "section2", "section3", "section4")
  assert set(feats) == set(model.feature_names) and len(t_feats) == 5
  for name, theirs in zip(model.feature_names, t_feats):
    ours = feats[name]
    theirs = np.transpose(theirs.numpy(), (0, 2, 3, 1))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4,
                               atol=1e-4 * float(np.abs(theirs).max()))


def test_converter_errors_are_one_line(tmp_path, capsys):
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
  assert convert_torchvision.main([str(tmp_path / "partial.pth"),
                                   str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "error:" in err and "bn1.weight" in err and "Traceback" not in err
  with pytest.raises(ValueError, match="bottleneck"):
    convert_torchvision.convert({"layer1.0.conv3.weight": np.zeros((1,))})
