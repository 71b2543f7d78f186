"""The base config of every experiment: the paper's CIFAR-10 setting (ResNet-26 ->
ResNet-26), and what every shipped config shares.

Shipped configs start from `get_config()` and override a few fields; any field can be
overridden on the command line (`--config.student.schedule.num_steps=1000`). Each takes
an argument after a colon, big_vision's way (`--config NAME:ARG`): `smoke` shrinks the
run to seconds on bundled digits (`apply_smoke`), and experiments with several
methods take `method=fitnet` or `method=kd`. Iterations and learning-rate boundaries
count steps of one global batch.
"""
import ml_collections

from fsp_jax import config_lib, methods
from fsp_jax.config_lib import parse_arg


# One stage's optimisation (SGD with momentum, piecewise-constant learning rate).
schedule = config_lib.schedule


def get_config(arg=None):
  """The base config; `arg` ('smoke') as for every shipped config."""
  arg = parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Multiplies every stage's num_steps and boundaries (keeps the schedule's shape).
  config.schedule_scale = 1.0

  config.data = ml_collections.ConfigDict(dict(
      source="tfds",  # 'tfds', 'folder' (ROOT/train/<class>/*) or 'digits' (bundled).
      name="cifar10",  # tfds name.
      data_dir="",  # tfds data_dir ('' = tfds default).
      root="",  # image folder root for source='folder'.
      # Where decoded image folders are kept for later processes ('' = nowhere): a
      # speed setting, not part of the experiment (not in stage fingerprints).
      cache_dir="",
      image_size=(),  # (H, W) to resize images to (folder, tfds); () keeps them.
      pad=4,  # pixels of zero padding before the random crop (paper: 4).
      flip=False,  # random horizontal flips (not in the paper).
      # (H, W): for larger images, a random-resized crop of this size replaces the
      # pad-and-crop in training, and test images are center-cropped to it. () = off.
      crop_size=(),
      # A part of the data set (e.g. transfer to another task from few examples):
      # class indices to keep, relabelled 0, 1, ... in this order (() = all), and the
      # first N training examples of each (0 = all).
      classes=(),
      train_per_class=0,
      # Where training batches are made: 'host' (NumPy and a prefetch thread; any data
      # size), 'device' (the training set on the device(s), batches gathered and
      # augmented by jitted ops), or 'auto': 'device' on GPU/TPU, 'host' on CPU
      # (measured: docs/performance.md). Both are pure functions of (seed, step), with
      # different random draws.
      pipeline="auto",
  ))

  config.teacher = ml_collections.ConfigDict(dict(
      # A preset (fsp_jax.models.MODELS) or a model of your own by import path,
      # 'PKG.MODULE:NAME' (a Linen module class or factory, or an NNX module class,
      # called with num_classes= and, for NNX, rngs=; docs/own_models.md).
      model="cifar_resnet26",
      width_multiplier=1,  # presets only.
      # Layer paths ('/'-separated submodule names, e.g. ('stem', 'block1', 'block2',
      # 'block3')) whose outputs are the model's features, in network order; () = a
      # preset's built-in features. FSP pairs teacher and student features by position.
      features=(),
      # Token maps (B, N, C) among the features: leading class/register tokens to drop,
      # and the (h, w) grid the rest are viewed as (() = square).
      drop_tokens=0,
      token_grid=(),
      # A trained teacher to restore instead of training one: a stage directory
      # (e.g. OTHER_WORKDIR/teacher) or its checkpoints/ folder. '' trains it here.
      checkpoint="",
      # Weights to fine-tune in the teacher stage (e.g. an ImageNet ResNet-34 from
      # `python -m fsp_jax.convert_torchvision`); a classifier of another size starts
      # from random weights. '' = train from random weights.
      pretrained="",
      # Classes of a restored teacher trained on another task; 0 = the data set's.
      num_classes=0,
      # The paper: 0.1 -> 0.01 -> 0.001 at 32k and 48k, stop at 64k.
      schedule=schedule(64000, (0.1, 0.01, 0.001), (32000, 48000)),
  ))

  config.student = ml_collections.ConfigDict(dict(
      model="cifar_resnet26",  # a preset or PKG.MODULE:NAME, as teacher.model.
      width_multiplier=1,
      # As teacher.features, drop_tokens and token_grid; fsp_pairs and FitNet's
      # hint/guided features name the student's features (or index them).
      features=(),
      drop_tokens=0,
      token_grid=(),
      # Stage 2 (main task from the stage-1 weights): 0.1/0.01/0.001 until 11k/16k/21k.
      schedule=schedule(21000, (0.1, 0.01, 0.001), (11000, 16000)),
  ))

  # Distillation methods to run (fsp_jax.methods; docs/methods.md), each adding its
  # stages: 'fsp' (stage 1 FSP -> 'student'), 'fitnet' (stage 1 hint -> 'fitnet',
  # stage 2 with KD), 'kd' (the student from random weights with cross-entropy + KD),
  # or a method of your own as 'PKG.MODULE:NAME'.
  config.methods = ("fsp",)
  # Each built-in method's section with its defaults: config.fsp (stage 1's FSP loss
  # and schedule), config.fitnet, config.kd (fsp_jax/methods/<name>.py).
  for method in methods.BUILTIN:
    for section in (method.section,) + tuple(o.section for o in method.objectives):
      if section not in config:
        config[section] = next(m for m in methods.BUILTIN
                               if m.section == section).default_section()

  # Extra runs for comparison: 'scratch' (the student architecture trained from random
  # weights with the student's schedule), 'teacher_short' (the teacher architecture
  # with the student's schedule, Table 1's "21k only" row).
  config.baselines = ("scratch",)
  # Train (or restore) the teacher only, e.g. to share one teacher between experiments.
  config.teacher_only = False

  config.eval_batch_size = 500
  config.eval_every = 2000  # steps; 0 evaluates only at the end of a stage.
  # Test examples of the evaluations during a stage (a fixed random subset); 0: all.
  # The final evaluation of a stage always takes the whole test set.
  config.eval_examples = 0
  config.log_every = 100
  config.checkpoint_every = 2000
  config.max_checkpoints_to_keep = 2
  config.half_precision = False  # bfloat16 activations (parameters stay float32).
  # Training steps per jitted call (lax.scan): fewer dispatches from Python, the same
  # steps. Logs, evaluations, checkpoints and SIGTERM still happen at their steps.
  config.steps_per_call = 1
  # Seeds seed, ..., seed + N - 1 of every stage after the teacher, trained side by
  # side in one program (vmap), with one shared teacher; results hold the mean, std,
  # each seed's and the ensemble's (mean softmax) test accuracy.
  config.num_seeds = 1
  # How the seeds share the program: 'vmap' (one batched program), 'unrolled' (one
  # copy of the step per seed in the same call) or 'auto': unrolled on CPU, where
  # vmap's grouped convolutions run 4.6-5.7x slower (docs/performance.md), vmap else.
  # The same numbers either way, within float tolerance.
  config.seed_axis = "auto"
  return finish(config, arg)


def apply_smoke(config):
  """The same pipeline in seconds: bundled digits at 8x8, ResNet-8s, a few steps.

  For a first check of a config, machine or launcher; every stage and method of the
  config still runs. Augmentation settings are kept.
  """
  config.schedule_scale = 1.0
  config.data.update(source="digits", image_size=(8, 8), pad=1, crop_size=(),
                     classes=tuple(c for c in config.data.classes if c < 10),
                     train_per_class=min(config.data.train_per_class, 100))
  for spec in (config.teacher, config.student):
    spec.model = "cifar_resnet8"
    spec.width_multiplier = 1
  config.teacher.pretrained = ""
  config.teacher.num_classes = 0
  config.teacher.checkpoint = ""
  for section, steps, lrs, bounds in ((config.teacher, 12, (0.1, 0.01), (8,)),
                                      (config.student, 8, (0.1, 0.01), (5,))):
    section.schedule = schedule(steps, lrs, bounds, batch_size=32,
                                augment=section.schedule.augment)
  for method in methods.registered():  # Each method's stage 1 in a few steps.
    if method.smoke is not None and method.section in config:
      method.smoke(config[method.section])
  config.eval_batch_size = 120
  config.eval_every = 4
  config.log_every = 4
  config.checkpoint_every = 4
  return config


def apply_method(config, method: str):
  """One distillation method instead of the config's: its stage 1 and stage 2 alone
  (no baselines), e.g. the FitNet rows of the paper's tables with `method='fitnet'`;
  the teacher is the config's (reuse it with `--config.teacher.checkpoint`)."""
  names = tuple(m.name for m in methods.registered())
  if method not in names:
    raise ValueError(f"config argument method={method!r}: choose one of {names}.")
  if tuple(config.methods) != (method,):
    config.methods = (method,)
    config.baselines = ()
  return config


# The paper configs' one change to the paper: stage 1's learning rate warms up linearly
# over its first 5 % of iterations (Eq. 2's sum and LR 1e-3 otherwise as written). The
# paper's stage 1 sits at the edge of stability: without it a ResNet-26 student diverged
# at iteration 9 from a 77.67 % teacher, with it its loss halved in 200 iterations
# (docs/reproduction.md). `:exact` drops the warm-up.
STAGE1_WARMUP = 0.05


def finish(config, arg):
  """Applies the shared config arguments (`smoke`, `method`, `exact`) that `arg`
  holds; a config taking `exact` gets the stage-1 warm-up unless `exact` is set."""
  if "exact" in arg and not arg.exact:
    config.fsp.schedule.warmup_steps = int(round(
        STAGE1_WARMUP * config.fsp.schedule.num_steps))
  if arg.get("method"):
    apply_method(config, arg.method)
  if arg.smoke:
    apply_smoke(config)
  return config
