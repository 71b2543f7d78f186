"""Test setup: four fake CPU devices, so every test also exercises data parallelism."""
import os

# Must be set before jax is imported anywhere in the test session.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TARBALL = os.path.join(os.path.dirname(REPO), "shared", "data",
                             "cifar10-images.tar.gz")


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
  """The real CIFAR-10 image folder, extracted once; skips where it is absent."""
  for candidate in (os.environ.get("FSP_CIFAR10_DIR", ""), "/tmp/cifar10"):
    if candidate and os.path.isdir(os.path.join(candidate, "train")):
      return candidate
  if not os.path.exists(CIFAR_TARBALL):
    pytest.skip("real CIFAR-10 not available (set FSP_CIFAR10_DIR or provide "
                "../shared/data/cifar10-images.tar.gz)")
  import tarfile
  out = tmp_path_factory.mktemp("cifar")
  with tarfile.open(CIFAR_TARBALL) as tar:
    tar.extractall(out, filter="data")
  return str(out / "cifar10")
