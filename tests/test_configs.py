"""Every shipped config loads and plans the stages the paper's experiment needs."""
import glob
import importlib.util
import os

import pytest

from fsp_jax import pipeline

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_plans_stages(path):
  config = load(path)
  names = [s.name for s in pipeline.plan_stages(config)]
  assert names[0] == "teacher" or config.teacher.checkpoint
  if config.teacher_only:
    return
  expected = {"fsp": ["fsp", "student"], "fitnet": ["fitnet_hint", "fitnet"],
              "kd": ["kd"]}
  planned = [n for m in config.methods for n in expected[m]]
  assert names[1:1 + len(planned)] == planned


def test_paper_hyperparameters():
  c = load(os.path.join(os.path.dirname(CONFIGS[0]), "cifar10_fast_optimization.py"))
  assert c.teacher.schedule.num_steps == 64000
  assert c.teacher.schedule.boundaries == (32000, 48000)
  assert c.fsp.schedule.learning_rates == (1e-3, 1e-4, 1e-5)
  assert c.fsp.schedule.boundaries == (11000, 16000) and c.fsp.schedule.num_steps == 21000
  assert c.student.schedule.learning_rates == (0.1, 0.01, 0.001)
  c100 = load(os.path.join(os.path.dirname(CONFIGS[0]), "cifar100_minimization.py"))
  assert c100.student.model == "cifar_resnet14" and c100.student.width_multiplier == 4
  assert c100.fsp.schedule.num_steps == 32000 and not c100.fsp.schedule.augment
  scaled = pipeline.plan_stages(c.unlock().copy_and_resolve_references())
  c.schedule_scale = 0.01
  stages = {s.name: s for s in pipeline.plan_stages(c)}
  assert stages["teacher"].schedule.num_steps == 640
  assert stages["teacher"].schedule.boundaries == (320, 480)
  assert len(scaled) == 4


def test_fitnet_and_transfer_hyperparameters():
  here = os.path.dirname(CONFIGS[0])
  c = load(os.path.join(here, "cifar10_fast_optimization_fitnet.py"))
  assert c.methods == ("fitnet",) and c.teacher.model == "cifar_resnet26"
  assert c.fitnet.schedule.num_steps == 35000
  assert c.fitnet.schedule.learning_rates == (1e-4, 1e-5)
  assert c.fitnet.schedule.boundaries == (25000,)
  assert (c.kd.temperature, c.kd.weight, c.kd.final_weight) == (3.0, 4.0, 1.0)
  stages = {s.name: s for s in pipeline.plan_stages(c)}
  assert stages["fitnet"].init_from == "fitnet_hint" and stages["fitnet"].distill == "kd"
  assert stages["fitnet"].schedule.num_steps == 21000
  c100 = load(os.path.join(here, "cifar100_minimization_fitnet.py"))
  assert c100.student.model == "cifar_resnet14" and not c100.fitnet.schedule.augment
  cub = load(os.path.join(here, "cub200_transfer.py"))
  assert cub.data.name == "caltech_birds2011" and cub.data.crop_size == (224, 224)
  assert (cub.teacher.model, cub.student.model) == ("resnet34", "resnet20_transfer")
  assert cub.student.schedule.boundaries == (10000, 20000)
  assert cub.student.schedule.num_steps == 30000
  # One FSP pair per section: 4 for the 4-section ImageNet ResNets.
  assert len(pipeline.build_distiller(cub, "fsp").pairs(5)) == 4
  assert [s.name for s in pipeline.plan_stages(cub)] == [
      "teacher", "fsp", "student", "fitnet_hint", "fitnet", "scratch"]
