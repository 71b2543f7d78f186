"""CIFAR-10 teacher ResNet-26 alone (paper: ~92%, 64k iterations, batch 128).

    python -m fsp_jax.main --config cifar10_teacher --workdir runs/c10_teacher

Other CIFAR-10 configs reuse it: --config.teacher.checkpoint=runs/c10_teacher/teacher
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  config = default.get_config()
  config.teacher_only = True
  return default.finish(config, arg)
