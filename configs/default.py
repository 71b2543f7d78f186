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

from fsp_jax.config_lib import parse_arg


def schedule(num_steps, learning_rates, boundaries, batch_size=128, momentum=0.9,
             weight_decay=1e-4, augment=True, eval_every=-1, warmup_steps=0):
  """One stage's optimisation: SGD with momentum, piecewise-constant learning rate.

  eval_every: test-set evaluations every this many steps of the stage; -1 takes the
  config's `eval_every`, 0 evaluates only at the end.
  warmup_steps: the learning rate rises linearly over the first this many steps
  (scaled with the schedule; 0 = none, the paper).
  """
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, learning_rates=tuple(learning_rates),
      boundaries=tuple(boundaries), batch_size=batch_size, momentum=momentum,
      weight_decay=weight_decay, augment=augment, eval_every=eval_every,
      warmup_steps=warmup_steps))


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

  # Distillation methods to run, each with its stages (see fsp_jax.distillers):
  # 'fsp' (stage 1 FSP -> 'student'), 'fitnet' (stage 1 hint -> 'fitnet', stage 2 with
  # KD), 'kd' (the student from random weights with cross-entropy + KD).
  config.methods = ("fsp",)

  # Stage 1: the FSP loss only.
  config.fsp = ml_collections.ConfigDict(dict(
      # (first, last) feature names, e.g. (('stem', 'section1'), ('section1',
      # 'section2')), or indices into the network's features; () = one per section.
      fsp_pairs=(),
      weights=(),  # lambda per pair; () = all 1.0 (the paper: all equal).
      pool="max",  # spatial mismatch: 'max' (paper) or 'avg'.
      # 'sum' of squared differences over each matrix's entries (Eq. 2, the paper) or
      # their 'mean' (PyTorch re-implementations; use LR ~0.05 with it). With 'sum',
      # LR 1e-3 is at the edge of stability on CIFAR (docs/reproduction/weak_teacher/findings.md).
      reduction="sum",
      # Beyond the paper: learned 1x1 convolutions map the student's feature maps to
      # the teacher's channel counts, so teachers of other widths can be used.
      adapter=False,
      schedule=schedule(21000, (0.001, 0.0001, 0.00001), (11000, 16000)),
      # A finished stage 1 to reuse (a stage directory, e.g. OTHER_WORKDIR/fsp): one
      # stage-1 result initialises several students, as in the paper's Table 1.
      checkpoint="",
      # Compute the frozen teacher's FSP matrices once per training example and reuse
      # them every epoch (the paper's suggestion): stage 1 then costs about one student
      # step. Needs un-augmented stage-1 inputs (fsp.schedule.augment=False, the
      # CIFAR-100 setting). Host memory: 4 bytes x sum(m*n) per example, e.g. CIFAR-100
      # at 4x width: (64*64 + 64*128 + 128*256) * 4 B = 176 KiB x 50,000 = 9.0 GB.
      cache_teacher=False,
      # With num_seeds > 1: True trains one stage 1 (seed `seed`) and starts every
      # seed's stage 2 from it, as the paper's Algorithm 1 and Table 1 do (the
      # spread then excludes stage-1 variance); False gives each seed its own.
      shared=False,
  ))

  # FitNet (Romero et al.) stage 1: a student layer regressed onto a teacher layer.
  config.fitnet = ml_collections.ConfigDict(dict(
      hint_feature="section2",  # the teacher's feature (name or index): the middle.
      guided_feature="section2",  # the student's feature.
      regressor_kernel=1,  # the regressor convolution's kernel size.
      pool="max",  # where hint and guided maps differ in spatial size.
      # The paper's FitNet baseline: 35k iterations, LR 1e-4, 1e-5 after 25k.
      schedule=schedule(35000, (1e-4, 1e-5), (25000,)),
  ))

  # Hinton KD, the term FitNet's stage 2 (and the 'kd' method) adds to cross-entropy:
  # weight * KL(softmax(teacher/T) || softmax(student/T)); the paper's FitNet: T = 3,
  # weight decaying linearly from 4 to 1 over the stage.
  config.kd = ml_collections.ConfigDict(dict(
      temperature=3.0,
      weight=4.0,
      final_weight=1.0,  # None keeps `weight` constant.
      scale_by_t_squared=False,  # Hinton et al. multiply by T^2.
  ))

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
  config.fsp.checkpoint = ""
  for section, steps, lrs, bounds in (
      (config.teacher, 12, (0.1, 0.01), (8,)), (config.fsp, 8, (1e-3,), ()),
      (config.student, 8, (0.1, 0.01), (5,)), (config.fitnet, 8, (1e-4,), ())):
    section.schedule = schedule(steps, lrs, bounds, batch_size=32,
                                augment=section.schedule.augment)
  config.eval_batch_size = 120
  config.eval_every = 4
  config.log_every = 4
  config.checkpoint_every = 4
  return config


def apply_method(config, method: str):
  """One distillation method instead of the config's: its stage 1 and stage 2 alone
  (no baselines), e.g. the FitNet rows of the paper's tables with `method='fitnet'`;
  the teacher is the config's (reuse it with `--config.teacher.checkpoint`)."""
  methods = ("fsp", "fitnet", "kd")
  if method not in methods:
    raise ValueError(f"config argument method={method!r}: choose one of {methods}.")
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
