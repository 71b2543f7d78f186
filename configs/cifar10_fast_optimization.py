"""Table 1, CIFAR-10 fast optimization: ResNet-26 -> ResNet-26.

Teacher 64k iterations; stage 1 (FSP) LR 1e-3/1e-4/1e-5 until 11k/16k/21k; stage 2
LR 0.1/0.01/0.001 until 11k/16k/21k (under 1/3 of the teacher's iterations). Baseline:
the teacher architecture trained for those same 21k iterations ("Teacher, 21k only").

`:method=fitnet` gives the table's FitNet row (paper: 91.72%, average of three nets):
stage 1 regresses the student's middle layer (end of section 2) onto the teacher's
through a learned 1x1 regressor (L2), 35k iterations at LR 1e-4, 1e-5 after 25k; stage
2 the main task with Hinton KD (T = 3, weight 4 -> 1 linearly), the table's stage-2
schedule. Run it in the same --workdir as the FSP run to reuse that run's teacher (or
pass --config.teacher.checkpoint=DIR/teacher).

Stage 1 warms its learning rate up over its first 5 % (default.STAGE1_WARMUP);
`:exact` runs the paper's stage 1 exactly as written.
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, method="fsp", smoke=False, exact=False)
  config = default.get_config()
  config.teacher.model = "cifar_resnet26"
  config.student.model = "cifar_resnet26"
  config.baselines = ("teacher_short",)
  return default.finish(config, arg)
