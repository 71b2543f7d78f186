"""Table 4, CIFAR-100 network minimization: ResNet-32 (4x) -> ResNet-14 (4x).

Stage 2 as long as the teacher (64k). Paper: scratch 58.65%, FSP 63.33%.

`:method=fitnet` gives the table's FitNet row (paper: 61.28%): the FitNet stage 1 and
stage 2 with Hinton KD (see cifar10_minimization), un-augmented.

Stage 1 warms its learning rate up over its first 5 % (default.STAGE1_WARMUP);
`:exact` runs the paper's stage 1 exactly as written.
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, method="fsp", smoke=False, exact=False)
  config = default.get_config()
  config.data.name = "cifar100"
  config.data.pad = 0
  config.teacher.model = "cifar_resnet32"
  config.student.model = "cifar_resnet14"
  config.teacher.width_multiplier = config.student.width_multiplier = 4
  config.teacher.schedule.augment = False
  config.student.schedule = default.schedule(64000, (0.1, 0.01, 0.001), (32000, 48000),
                                             augment=False)
  config.fsp.schedule = default.schedule(32000, (1e-3, 1e-4, 1e-5), (16000, 24000),
                                         augment=False)
  config.fitnet.schedule.augment = False
  config.baselines = ("scratch",)
  return default.finish(config, arg)
