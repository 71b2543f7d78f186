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


def with_devices(env, n):
  """`env` with XLA faking `n` CPU devices (for a subprocess)."""
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(env, XLA_FLAGS=" ".join(flags + [
      f"--xla_force_host_platform_device_count={n}"]))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  """Environment of command-line subprocesses: CPU, 2 devices, a shared compile cache.

  The persistent JAX compilation cache lets only the first run of a program compile
  (seconds instead of tens of seconds on 2 cores); a cached executable computes exactly
  what a fresh compile does.
  """
  cache = tmp_path_factory.mktemp("jax_cache")
  return with_devices(dict(
      os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1"), 2)
