"""The paper's CIFAR-10 setting: teacher ResNet-26, student ResNet-26 (see config_lib)."""
from fsp_jax.config_lib import get_config  # noqa: F401
