"""Transfer demo, part 1: a teacher for one task (CIFAR-10 classes 0-4: airplane,
automobile, bird, cat, deer), all 25,000 training images. ResNet-14, 2,000 steps of
batch 128 (10 epochs): about 14 minutes on 2 CPU cores (82.4 % on its 5 classes).

    python -m fsp_jax.main --config configs/transfer_demo_teacher.py \
        --config.data.root=/tmp/cifar10 --workdir runs/demo_teacher

Part 2 (configs/transfer_demo.py) distils it into a student for another task.
"""
from fsp_jax import config_lib


def get_config():
  config = config_lib.get_config()
  config.data.source = "folder"
  config.data.root = ""  # --config.data.root=DIR (DIR/train/<class>/, DIR/test/<class>/)
  config.data.classes = (0, 1, 2, 3, 4)
  config.teacher.model = "cifar_resnet14"
  config.teacher.schedule = config_lib.schedule(2000, (0.1, 0.01, 0.001), (1000, 1500),
                                                batch_size=128)
  config.teacher_only = True
  config.eval_every = 500
  config.log_every = 100
  config.checkpoint_every = 250
  return config
