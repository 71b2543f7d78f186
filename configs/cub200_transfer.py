"""Table 5, transfer learning on CUB-200-2011: ImageNet ResNet-34 -> "ResNet-20" (2/2/3/2).

Rows (paper, accuracy %): teacher = ImageNet ResNet-34 fine-tuned on CUB (77.72),
student from scratch (47.73), FitNet (70.19), FSP (74.26). One run gives all four:

    python -m fsp_jax.convert_torchvision resnet34-b627a593.pth runs/resnet34_imagenet
    python -m fsp_jax.main --config cub200_transfer --workdir runs/cub200 \
        --config.teacher.pretrained=runs/resnet34_imagenet

(the .pth is torchvision's ImageNet `resnet34` state dict; its 1000-way classifier is
replaced by a random 200-way one and the whole network fine-tuned). Data: tfds
`caltech_birds2011` (5,994 training, 5,794 test images of varied sizes), resized to
256x256 on loading, trained on random-resized 224x224 crops with flips, tested on the
central 224x224 crop. Offline: `--config.data.source=folder --config.data.root=DIR`
with DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg.

From the paper: student LR 0.1/0.01/0.001 up to 10k/20k/30k; stage 1 with one FSP
matrix per section (4 pairs). Not in the paper, our choices: batch 64, the teacher
fine-tuned 10x lower (0.01/0.001/0.0001, same steps), stage 1 with the CIFAR stage-1
learning rates over 30k, FitNet's hint at the end of section 2. `:method=fsp` or
`:method=fitnet` runs one of the two methods (and no baseline).

Stage 1 warms its learning rate up over its first 5 % (default.STAGE1_WARMUP);
`:exact` runs the paper's stage 1 exactly as written.
"""
from fsp_jax.config_lib import parse_arg
from fsp_jax.configs import default


def get_config(arg=None):
  arg = parse_arg(arg, method="", smoke=False, exact=False)
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "caltech_birds2011"
  config.data.image_size = (256, 256)
  config.data.crop_size = (224, 224)
  config.data.pad = 0
  config.data.flip = True

  config.teacher.model = "resnet34"
  config.teacher.pretrained = ""  # Required: --config.teacher.pretrained=CONVERTED_DIR
  config.teacher.schedule = default.schedule(30000, (0.01, 0.001, 0.0001),
                                                (10000, 20000), batch_size=64)
  config.student.model = "resnet20_transfer"
  config.student.schedule = default.schedule(30000, (0.1, 0.01, 0.001),
                                                (10000, 20000), batch_size=64)
  # () = one pair per section: (stem, s1), (s1, s2), (s2, s3), (s3, s4).
  config.fsp.fsp_pairs = ()
  config.fsp.schedule = default.schedule(30000, (1e-3, 1e-4, 1e-5), (10000, 20000),
                                            batch_size=64)
  config.fitnet.schedule = default.schedule(35000, (1e-4, 1e-5), (25000,),
                                               batch_size=64)
  config.methods = ("fsp", "fitnet")
  config.baselines = ("scratch",)
  config.eval_batch_size = 200
  return default.finish(config, arg)
