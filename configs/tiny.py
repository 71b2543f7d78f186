"""Smoke test: the whole pipeline in seconds (digits at 8x8, ResNet-8, a few steps).

Used by the tests (kill-and-resume, multi-host); also a quick check of a new machine
or launcher: `python -m fsp_jax.main --config configs/tiny.py --workdir /tmp/tiny`.
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.data.source = "digits"
  config.data.image_size = (8, 8)
  config.data.pad = 1
  config.teacher.model = "cifar_resnet8"
  config.student.model = "cifar_resnet8"
  config.teacher.schedule = config_lib.schedule(12, (0.1, 0.01), (8,), batch_size=32)
  config.fsp.schedule = config_lib.schedule(8, (1e-3,), (), batch_size=32)
  config.student.schedule = config_lib.schedule(8, (0.1, 0.01), (5,), batch_size=32)
  config.baselines = ("scratch",)
  config.eval_batch_size = 120
  config.eval_every = 4
  config.log_every = 4
  config.checkpoint_every = 4
  return config
