"""Quickstart: the whole pipeline on bundled real data in a few minutes on 2 CPU cores.

Data: scikit-learn's handwritten digits (1,797 real scans, shipped with the package,
no download), upsampled to 16x16. Teacher CIFAR ResNet-14, student ResNet-8; teacher,
FSP stage, FSP student and scratch student, then a table of test accuracies.
`quickstart:smoke` runs the same stages in seconds (digits at 8x8, a few steps).
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  config = default.get_config()
  config.data.source = "digits"
  config.data.image_size = (16, 16)
  config.data.pad = 2
  config.teacher.model = "cifar_resnet14"
  config.teacher.schedule = default.schedule(600, (0.1, 0.01, 0.001), (300, 450),
                                             batch_size=64)
  config.student.model = "cifar_resnet8"
  # Short main-task schedule: where FSP's fast optimisation shows.
  config.student.schedule = default.schedule(150, (0.1, 0.01, 0.001), (80, 120),
                                             batch_size=64)
  config.fsp.schedule = default.schedule(300, (1e-3, 1e-4, 1e-5), (160, 240),
                                         batch_size=64)
  config.baselines = ("scratch",)
  config.eval_batch_size = 360
  config.eval_every = 50
  config.log_every = 50
  config.checkpoint_every = 200
  return default.finish(config, arg)
