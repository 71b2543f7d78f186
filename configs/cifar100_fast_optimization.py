"""Table 2, CIFAR-100 fast optimization: ResNet-32 at 4x width -> itself.

No augmentation anywhere (the paper's CIFAR-100 setting); stage 1 LR 1e-3/1e-4/1e-5
until 16k/24k/32k; stage 2 as for CIFAR-10 (21k). Paper: teacher 64.15%, teacher 21k
61.32%, FSP student 64.65%. Stage 1 is un-augmented, so
`--config.fsp.cache_teacher=True` computes the teacher's FSP matrices once (9 GB of host
memory) and stage 1 costs about one student step.

`:method=fitnet` gives the table's FitNet row (paper: 62.55%): the FitNet stage 1 and
stage 2 with Hinton KD (see cifar10_fast_optimization), un-augmented.

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
  for spec in (config.teacher, config.student):
    spec.model = "cifar_resnet32"
    spec.width_multiplier = 4
  config.teacher.schedule.augment = False
  config.student.schedule.augment = False
  config.fsp.schedule = default.schedule(32000, (1e-3, 1e-4, 1e-5), (16000, 24000),
                                         augment=False)
  config.fitnet.schedule.augment = False
  config.baselines = ("teacher_short",)
  return default.finish(config, arg)
