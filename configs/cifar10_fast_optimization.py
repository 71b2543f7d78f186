"""Table 1, CIFAR-10 fast optimization: ResNet-26 -> ResNet-26.

Teacher 64k iterations; stage 1 (FSP) LR 1e-3/1e-4/1e-5 until 11k/16k/21k; stage 2
LR 0.1/0.01/0.001 until 11k/16k/21k (under 1/3 of the teacher's iterations). Baseline:
the teacher architecture trained for those same 21k iterations ("Teacher, 21k only").
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.teacher.model = "cifar_resnet26"
  config.student.model = "cifar_resnet26"
  config.baselines = ("teacher_short",)
  return config
