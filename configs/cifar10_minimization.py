"""Table 3, CIFAR-10 network minimization: ResNet-26 -> ResNet-8.

Stage 2 trains as long as the teacher (64k, LR drops at 32k and 48k); the baseline is
ResNet-8 from scratch with the same schedule (paper: 87.91% scratch, 88.70% FSP).
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.student.model = "cifar_resnet8"
  config.student.schedule = config_lib.schedule(64000, (0.1, 0.01, 0.001), (32000, 48000))
  config.baselines = ("scratch",)
  return config
