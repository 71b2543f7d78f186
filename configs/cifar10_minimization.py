"""Table 3, CIFAR-10 network minimization: ResNet-26 -> ResNet-8.

Stage 2 trains as long as the teacher (64k, LR drops at 32k and 48k); the baseline is
ResNet-8 from scratch with the same schedule (paper: 87.91% scratch, 88.70% FSP).

`:method=fitnet` gives the table's FitNet row (paper: 88.57%): the FitNet stage 1
(hints, 35k iterations at LR 1e-4, 1e-5 after 25k) and stage 2 with Hinton KD, with
this table's stage-2 schedule. Run it in the same --workdir as the FSP run to reuse that
run's teacher (or pass --config.teacher.checkpoint=DIR/teacher).

Stage 1 warms its learning rate up over its first 5 % (default.STAGE1_WARMUP);
`:exact` runs the paper's stage 1 exactly as written.
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, method="fsp", smoke=False, exact=False)
  config = default.get_config()
  config.student.model = "cifar_resnet8"
  config.student.schedule = default.schedule(64000, (0.1, 0.01, 0.001), (32000, 48000))
  config.baselines = ("scratch",)
  return default.finish(config, arg)
