"""torchvision ResNet-18/34 weights (.pth state dict) -> an fsp_jax checkpoint.

    python -m fsp_jax.convert_torchvision resnet34-b627a593.pth OUT_DIR

writes `OUT_DIR/checkpoints/0/model` (Orbax), the layout of a stage directory, so that
`--config.teacher.pretrained=OUT_DIR` fine-tunes it (a 1000-class ImageNet classifier is
replaced by a random one of the data set's size), or, for a network already trained on
the task, `--config.teacher.checkpoint=OUT_DIR` uses it as the teacher as it is.

The ImageNet presets of `fsp_jax.models` have torchvision's layout and padding, so the
converted network computes what the PyTorch one computes (up to float rounding) on the
same normalised input, NHWC here and NCHW there. torchvision's ImageNet weights expect
inputs normalised by ImageNet's mean and std; training normalises by the training
set's own statistics, which fine-tuning absorbs. Reading a .pth needs PyTorch
(`pip install 'fsp_jax[torch]'`); nothing else here does.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Dict, Tuple

import jax
import numpy as np

from fsp_jax import checkpoints, models

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\."
                    r"(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\."
                    r"(weight|bias|running_mean|running_var|num_batches_tracked)$")
_BLOCK_NAMES = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                "downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn"}
_BN_PARAM = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The arrays of a PyTorch state dict file (`module.` prefixes of DataParallel and a
  `{'state_dict': ...}` wrapper are accepted)."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading a .pth file needs PyTorch: pip install torch (or "
                      "pip install 'fsp_jax[torch]').") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist.") from None
  except Exception as e:  # torch raises pickle and zip errors of many kinds.
    raise ValueError(f"{path} is not a readable PyTorch state dict ({e}).") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                     "the weights with torch.save(model.state_dict(), path).")
  return {k[len("module."):] if k.startswith("module.") else k:
          v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW -> Flax HWIO."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32)


def _model_name(modules_per_section: Tuple[int, ...]) -> str:
  for name, make in models.MODELS.items():
    if name.startswith("resnet") and tuple(make.args[0]) == modules_per_section:
      return name
  raise ValueError(f"no fsp_jax preset has {modules_per_section} modules per section; "
                   "torchvision resnet18 (2, 2, 2, 2) and resnet34 (3, 4, 6, 3) are "
                   "supported.")


def convert(state_dict: Dict[str, np.ndarray]) -> Tuple[str, int, int, Dict[str, Any]]:
  """torchvision basic-block ResNet state dict -> fsp_jax variables.

  Args:
    state_dict: name -> array, torchvision's names (conv1, bn1, layer1.0.conv1, ...,
      layer2.0.downsample.0, ..., fc).

  Returns:
    `(model_name, num_classes, width_multiplier, {'params', 'batch_stats'})`, ready for
    `models.create_model(model_name, num_classes, width_multiplier)`.
  """
  if any(".conv3." in k for k in state_dict):
    raise ValueError("bottleneck ResNets (resnet50 and deeper) are not supported: "
                     "fsp_jax's ImageNet presets use basic blocks (resnet18, resnet34).")
  params: Dict[str, Any] = {}
  stats: Dict[str, Any] = {}
  used = set()

  def take(key):
    if key not in state_dict:
      raise ValueError(f"the state dict has no {key!r}: it is not a torchvision "
                       "resnet18/resnet34.")
    used.add(key)
    return np.asarray(state_dict[key], np.float32)

  def bn(prefix, scope):
    for torch_name, (collection, name) in _BN_PARAM.items():
      target = params if collection == "params" else stats
      target.setdefault(scope, {})[name] = take(f"{prefix}.{torch_name}")
    used.add(f"{prefix}.num_batches_tracked")

  params["stem_conv"] = {"kernel": _conv(take("conv1.weight"))}
  bn("bn1", "stem_bn")
  counts: Dict[int, int] = {}
  for key in state_dict:
    m = _BLOCK.match(key)
    if m:
      s, b = int(m.group(1)), int(m.group(2))
      counts[s] = max(counts.get(s, 0), b + 1)
  if sorted(counts) != [1, 2, 3, 4]:
    raise ValueError(f"expected layer1..layer4 in the state dict; found layers "
                     f"{sorted(counts)}.")
  modules = tuple(counts[s] for s in (1, 2, 3, 4))
  for s in (1, 2, 3, 4):
    for b in range(counts[s]):
      scope = f"section{s}_module{b + 1}"
      for torch_part, ours in _BLOCK_NAMES.items():
        prefix = f"layer{s}.{b}.{torch_part}"
        if f"{prefix}.weight" not in state_dict:
          continue  # No downsample in this block.
        if "conv" in ours:
          params.setdefault(scope, {})[ours] = {"kernel": _conv(take(f"{prefix}.weight"))}
        else:
          for torch_name, (collection, leaf) in _BN_PARAM.items():
            target = params if collection == "params" else stats
            target.setdefault(scope, {}).setdefault(ours, {})[leaf] = take(
                f"{prefix}.{torch_name}")
          used.add(f"{prefix}.num_batches_tracked")
  fc = take("fc.weight")
  params["classifier"] = {"kernel": np.ascontiguousarray(fc.T), "bias": take("fc.bias")}
  unused = sorted(k for k in state_dict if k not in used)
  if unused:
    raise ValueError(f"the state dict has entries this converter does not know: "
                     f"{unused[:5]}; it is not a torchvision resnet18/resnet34.")
  width = params["stem_conv"]["kernel"].shape[-1]
  if width % 64:
    raise ValueError(f"conv1 has {width} output channels; expected a multiple of 64.")
  return _model_name(modules), fc.shape[0], width // 64, {"params": params,
                                                          "batch_stats": stats}


def check_against_model(model, variables) -> None:
  """Raises ValueError unless `variables` has exactly the arrays `model` expects."""
  expected = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0),
                                                         (64, 64, 3)))
  exp = {jax.tree_util.keystr(kp): v.shape
         for kp, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {jax.tree_util.keystr(kp): v.shape
         for kp, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  if exp.keys() != got.keys():
    raise ValueError(f"converted arrays differ from the model's: missing "
                     f"{sorted(exp.keys() - got.keys())[:3]}, extra "
                     f"{sorted(got.keys() - exp.keys())[:3]}.")
  for k, shape in exp.items():
    if tuple(shape) != tuple(got[k]):
      raise ValueError(f"converted {k} has shape {tuple(got[k])}; the model expects "
                       f"{tuple(shape)}.")


def convert_file(pth_path: str, out_dir: str) -> Tuple[str, int]:
  """Converts `pth_path` and writes it under `out_dir`; returns (model name, classes)."""
  if os.path.exists(os.path.join(out_dir, checkpoints.CHECKPOINT_DIR)):
    raise ValueError(f"{out_dir} already holds a checkpoint; give a new directory.")
  name, num_classes, width, variables = convert(load_state_dict(pth_path))
  model = models.create_model(name, num_classes, width)
  check_against_model(model, variables)
  checkpoints.save_model(out_dir, variables)
  return name, num_classes


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fsp_jax.convert_torchvision",
      description="Convert a torchvision resnet18/resnet34 state dict (.pth) to an "
                  "fsp_jax checkpoint (config.teacher.pretrained or .checkpoint).")
  parser.add_argument("pth", help="torchvision state dict, e.g. resnet34-b627a593.pth")
  parser.add_argument("out_dir", help="directory to write (OUT_DIR/checkpoints/0)")
  args = parser.parse_args(argv)
  try:
    name, num_classes = convert_file(args.pth, args.out_dir)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"fsp_jax.convert_torchvision: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.pth} -> {args.out_dir}: {name}, {num_classes} classes.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
