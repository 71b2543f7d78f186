"""Table 4, CIFAR-100 network minimization: ResNet-32 (4x) -> ResNet-14 (4x).

Stage 2 as long as the teacher (64k). Paper: scratch 58.65%, FSP 63.33%.
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.data.name = "cifar100"
  config.data.pad = 0
  config.teacher.model = "cifar_resnet32"
  config.student.model = "cifar_resnet14"
  config.teacher.width_multiplier = config.student.width_multiplier = 4
  config.teacher.schedule.augment = False
  config.student.schedule = config_lib.schedule(64000, (0.1, 0.01, 0.001), (32000, 48000),
                                                augment=False)
  config.fsp.schedule = config_lib.schedule(32000, (1e-3, 1e-4, 1e-5), (16000, 24000),
                                            augment=False)
  config.baselines = ("scratch",)
  return config
