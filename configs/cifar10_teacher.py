"""CIFAR-10 teacher ResNet-26 alone (paper: ~92%, 64k iterations, batch 128).

    python -m fsp_jax.main --config configs/cifar10_teacher.py --workdir runs/c10_teacher

Other CIFAR-10 configs reuse it: --config.teacher.checkpoint=runs/c10_teacher/teacher
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.teacher_only = True
  return config
