"""The base config of every experiment: the paper's CIFAR-10 setting (teacher ResNet-26).

Config files in `configs/` start from `get_config()` and override a few fields; any
field can be overridden on the command line (`--config.student.schedule.num_steps=1000`).
Iterations and learning-rate boundaries count steps of one global batch.
"""
import ml_collections


def schedule(num_steps, learning_rates, boundaries, batch_size=128, momentum=0.9,
             weight_decay=1e-4, augment=True, eval_every=-1):
  """One stage's optimisation: SGD with momentum, piecewise-constant learning rate.

  eval_every: test-set evaluations every this many steps of the stage; -1 takes the
  config's `eval_every`, 0 evaluates only at the end.
  """
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, learning_rates=tuple(learning_rates),
      boundaries=tuple(boundaries), batch_size=batch_size, momentum=momentum,
      weight_decay=weight_decay, augment=augment, eval_every=eval_every))


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Multiplies every stage's num_steps and boundaries (keeps the schedule's shape).
  config.schedule_scale = 1.0

  config.data = ml_collections.ConfigDict(dict(
      source="tfds",  # 'tfds', 'folder' (ROOT/train/<class>/*) or 'digits' (bundled).
      name="cifar10",  # tfds name.
      data_dir="",  # tfds data_dir ('' = tfds default).
      root="",  # image folder root for source='folder'.
      image_size=(),  # (H, W) to resize folder images to; () keeps them.
      pad=4,  # pixels of zero padding before the random crop (paper: 4).
      flip=False,  # random horizontal flips (not in the paper).
  ))

  config.teacher = ml_collections.ConfigDict(dict(
      model="cifar_resnet26",
      width_multiplier=1,
      # A trained teacher to restore instead of training one: a stage directory
      # (e.g. OTHER_WORKDIR/teacher) or its checkpoints/ folder. '' trains it here.
      checkpoint="",
      # The paper: 0.1 -> 0.01 -> 0.001 at 32k and 48k, stop at 64k.
      schedule=schedule(64000, (0.1, 0.01, 0.001), (32000, 48000)),
  ))

  config.student = ml_collections.ConfigDict(dict(
      model="cifar_resnet26",
      width_multiplier=1,
      # Stage 2 (main task from the stage-1 weights): 0.1/0.01/0.001 until 11k/16k/21k.
      schedule=schedule(21000, (0.1, 0.01, 0.001), (11000, 16000)),
  ))

  # Stage 1: the FSP loss only.
  config.fsp = ml_collections.ConfigDict(dict(
      # (i, j) indices into the features (stem, section_1, ...); () = one per section.
      fsp_pairs=(),
      weights=(),  # lambda per pair; () = all 1.0 (the paper: all equal).
      pool="max",  # spatial mismatch: 'max' (paper) or 'avg'.
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
  ))

  # Extra runs for comparison: 'scratch' (the student architecture trained from random
  # weights with the student's schedule), 'teacher_short' (the teacher architecture
  # with the student's schedule, Table 1's "21k only" row).
  config.baselines = ("scratch",)
  # Train (or restore) the teacher only, e.g. to share one teacher between experiments.
  config.teacher_only = False

  config.eval_batch_size = 500
  config.eval_every = 2000  # steps; 0 evaluates only at the end of a stage.
  config.log_every = 100
  config.checkpoint_every = 2000
  config.max_checkpoints_to_keep = 2
  config.half_precision = False  # bfloat16 activations (parameters stay float32).
  return config
