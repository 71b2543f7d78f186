"""Table 4 (CIFAR-100 network minimization), FitNet row: ResNet-32 (4x) -> ResNet-14
(4x). Paper: 61.28%, stage 2 of 64k iterations, no augmentation.

The table's own config with FitNet instead of FSP: stage 1 regresses the student's
middle layer (end of section 2) onto the teacher's through a learned 1x1 regressor (L2),
35k iterations at LR 1e-4, 1e-5 after 25k; stage 2 the main task with Hinton KD (T = 3,
weight 4 -> 1 linearly), with the table's stage-2 schedule. Run it in the same
--workdir as configs/cifar100_minimization.py to reuse that run's teacher (or pass
--config.teacher.checkpoint=DIR/teacher).
"""
import os

from fsp_jax import config_lib


def get_config():
  config = config_lib.config_from_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "cifar100_minimization.py"))
  config.methods = ("fitnet",)
  config.baselines = ()
  config.fitnet.schedule.augment = False  # No augmentation in the CIFAR-100 setting.
  return config
