"""The distiller zoo on CIFAR-10: every method, one teacher, one student schedule.

Teacher ResNet-26 (cifar10_teacher's schedule), students ResNet-8 with Table 3's
main-task schedule (64k iterations, 0.1/0.01/0.001 at 32k/48k, batch 128), the same
for every method; a method with a stage 1 (fsp, fitnet, ab, ft) trains it first on
its own schedule. Each method at its paper's (RepDistiller's, DKD: mdistiller's)
default weight; scratch is the baseline; 3 seeds side by side.

    python experiments/zoo.py --data_root /tmp/cifar10    # the table, resumable
    python -m fsp_jax.main --config cifar10_zoo --workdir runs/zoo   # one run

`:recipe=repdistiller` trains teacher and students on RepDistiller's CIFAR recipe
instead (benchmarks/gpu/run.sh's zoo); `:smoke` shrinks it to seconds on the bundled
digits.
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default
from fsp_jax.validation import ConfigError

# The rows of the zoo's table besides scratch: each built-in method and CRD+KD, in the
# order their stages run.
METHODS = ("fsp", "fitnet", "kd", "at", "sp", "pkt", "rkd", "nst", "cc", "vid", "ab",
           "ft", "crd", "dkd", "crd+kd")


# RepDistiller's CIFAR recipe (`:recipe=repdistiller`), for teacher and students alike:
# 240 epochs of 50,000 images at batch 64, LR 0.05 times 0.1 at epochs 150, 180 and
# 210, momentum 0.9, weight decay 5e-4.
_EPOCH = 50000 / 64
REPDISTILLER = dict(num_steps=round(240 * _EPOCH),
                    learning_rates=(0.05, 0.005, 0.0005, 0.00005),
                    boundaries=tuple(round(e * _EPOCH) for e in (150, 180, 210)),
                    batch_size=64, weight_decay=5e-4)
RECIPES = ("paper", "repdistiller")


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False, exact=False, recipe="paper")
  if arg.recipe not in RECIPES:
    raise ConfigError(f"cifar10_zoo:recipe={arg.recipe!r} is not one of {RECIPES}: "
                     "'paper' (the FSP paper's schedules), 'repdistiller' (240 epochs at "
                     "batch 64, LR 0.05).")
  config = default.get_config()
  config.student.model = "cifar_resnet8"
  config.student.schedule = default.schedule(64000, (0.1, 0.01, 0.001), (32000, 48000))
  if arg.recipe == "repdistiller":
    for role in ("teacher", "student"):
      config[role].schedule = default.schedule(**REPDISTILLER)
  config.methods = METHODS
  config.baselines = ("scratch",)
  config.num_seeds = 3
  return default.finish(config, arg)
