"""Every shipped config loads by name, takes its arguments and plans the paper's stages."""
import os

import pytest

from fsp_jax import config_lib, methods, models, stages, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["cifar100_fast_optimization", "cifar100_minimization",
           "cifar10_fast_optimization", "cifar10_minimization", "cifar10_teacher",
           "cifar10_zoo", "cub200_transfer", "default", "quickstart", "transfer_demo"]
EXPECTED = {"fsp": ["fsp", "student"], "fitnet": ["fitnet_hint", "fitnet"], "kd": ["kd"],
            "ab": ["ab_init", "ab"], "ft": ["ft_paraphraser", "ft"], "crd+kd": ["crd+kd"],
            **{m: [m] for m in ("at", "sp", "pkt", "rkd", "nst", "cc", "vid", "crd",
                                "dkd")}}


def test_every_config_of_the_folder_is_shipped():
  on_disk = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(REPO, "configs"))
                   if n.endswith(".py") and not n.startswith("_"))
  assert config_lib.names() == on_disk == SHIPPED


@pytest.mark.parametrize("spec", SHIPPED + [f"{n}:smoke" for n in SHIPPED] + [
    "cifar10_minimization:method=fitnet", "cifar100_minimization:method=fitnet,smoke",
    "transfer_demo:teacher", "cub200_transfer:method=fsp"])
def test_config_plans_stages(spec):
  config = config_lib.load(spec)
  validation.check_config(config)  # Every setting of a shipped config can run.
  names = [s.name for s in stages.plan_stages(config)]
  assert names[0] == "teacher" or config.teacher.checkpoint
  for stage in stages.plan_stages(config):  # The scaled schedules too.
    validation.check_schedule(stage.schedule, stage.schedule_field)
  if config.teacher_only:
    return
  planned = [n for m in config.methods for n in EXPECTED[m]]
  assert names[1:1 + len(planned)] == planned


def test_config_by_path_and_by_name_are_the_same():
  by_path = config_lib.load(os.path.join(REPO, "configs", "cifar10_minimization.py")
                            + ":method=fitnet")
  assert by_path == config_lib.load("cifar10_minimization:method=fitnet")
  assert config_lib.config_file("quickstart").endswith(os.path.join("configs",
                                                                    "quickstart.py"))


def test_config_arguments():
  assert config_lib.parse_arg("method=fitnet,smoke", method="fsp", smoke=False).to_dict() == {
      "method": "fitnet", "smoke": True}
  assert config_lib.parse_arg(None, smoke=False).to_dict() == {"smoke": False}
  assert not config_lib.parse_arg("smoke=false", smoke=True).smoke
  assert config_lib.parse_arg("n=3", n=1).n == 3
  with pytest.raises(ValueError, match="unknown config argument 'smok'.*smoke"):
    config_lib.parse_arg("smok", smoke=False)
  with pytest.raises(ValueError, match="takes a int"):
    config_lib.parse_arg("n=three", n=1)
  with pytest.raises(ValueError, match="method='bogus'"):
    config_lib.load("cifar10_minimization:method=bogus")
  with pytest.raises(ValueError, match="unknown config 'no_such'.*quickstart"):
    config_lib.config_file("no_such")


def test_smoke_keeps_the_experiment_and_shrinks_the_run():
  full = config_lib.load("cifar100_minimization:method=fitnet")
  smoke = config_lib.load("cifar100_minimization:method=fitnet,smoke")
  assert smoke.methods == full.methods == ("fitnet",)
  assert smoke.data.source == "digits" and smoke.data.image_size == (8, 8)
  assert smoke.teacher.model == smoke.student.model == "cifar_resnet8"
  assert smoke.student.schedule.num_steps == 8
  assert not smoke.student.schedule.augment  # The CIFAR-100 setting is kept.
  # quickstart:smoke is the smoke-test pipeline the reliability tests use.
  q = config_lib.load("quickstart:smoke")
  assert (q.teacher.schedule.num_steps, q.fsp.schedule.num_steps,
          q.student.schedule.num_steps) == (12, 8, 8)
  assert q.teacher.schedule.boundaries == (8,) and q.student.schedule.boundaries == (5,)
  assert q.checkpoint_every == q.eval_every == q.log_every == 4


def test_paper_hyperparameters():
  c = config_lib.load("cifar10_fast_optimization")
  assert c.teacher.schedule.num_steps == 64000
  assert c.teacher.schedule.boundaries == (32000, 48000)
  assert c.fsp.schedule.learning_rates == (1e-3, 1e-4, 1e-5)
  assert c.fsp.schedule.boundaries == (11000, 16000) and c.fsp.schedule.num_steps == 21000
  assert c.student.schedule.learning_rates == (0.1, 0.01, 0.001)
  assert c.fsp.reduction == "sum" and c.fsp.pool == "max"
  c100 = config_lib.load("cifar100_minimization")
  assert c100.student.model == "cifar_resnet14" and c100.student.width_multiplier == 4
  assert c100.fsp.schedule.num_steps == 32000 and not c100.fsp.schedule.augment
  scaled = stages.plan_stages(c.unlock().copy_and_resolve_references())
  c.schedule_scale = 0.01
  by_name = {s.name: s for s in stages.plan_stages(c)}
  assert by_name["teacher"].schedule.num_steps == 640
  assert by_name["teacher"].schedule.boundaries == (320, 480)
  assert len(scaled) == 4
  # The one change to the paper: stage 1 warms up over its first 5 %, scaled along.
  assert c.fsp.schedule.warmup_steps == 1050
  assert by_name["fsp"].schedule.warmup_steps == 10
  assert by_name["student"].schedule.warmup_steps == 0


@pytest.mark.parametrize("name", ["cifar10_fast_optimization", "cifar10_minimization",
                                  "cifar100_fast_optimization", "cifar100_minimization",
                                  "cub200_transfer"])
def test_paper_configs_warm_stage1_up_unless_exact(name):
  warm, exact = config_lib.load(name), config_lib.load(name + ":exact")
  assert warm.fsp.schedule.warmup_steps == round(0.05 * warm.fsp.schedule.num_steps) > 0
  assert exact.fsp.schedule.warmup_steps == 0
  warm.fsp.schedule.warmup_steps = 0
  assert warm.to_dict() == exact.to_dict()  # Nothing else differs.


def test_fitnet_and_transfer_hyperparameters():
  c = config_lib.load("cifar10_fast_optimization:method=fitnet")
  assert c.methods == ("fitnet",) and c.baselines == () and c.teacher.model == "cifar_resnet26"
  assert c.fitnet.schedule.num_steps == 35000
  assert c.fitnet.schedule.learning_rates == (1e-4, 1e-5)
  assert c.fitnet.schedule.boundaries == (25000,)
  assert (c.kd.temperature, c.kd.weight, c.kd.final_weight) == (3.0, 4.0, 1.0)
  by_name = {s.name: s for s in stages.plan_stages(c)}
  assert by_name["fitnet"].init_from == "fitnet_hint" and by_name["fitnet"].distill == "kd"
  assert by_name["fitnet"].schedule.num_steps == 21000
  names = models.create_model("cifar_resnet26", 10).feature_names
  hint = methods.build_objective(methods.Hint, c, names)
  assert (hint.hint_feature, hint.guided_feature) == ("section2", "section2")
  c100 = config_lib.load("cifar100_minimization:method=fitnet")
  assert c100.student.model == "cifar_resnet14" and not c100.fitnet.schedule.augment
  cub = config_lib.load("cub200_transfer")
  assert cub.data.name == "caltech_birds2011" and cub.data.crop_size == (224, 224)
  assert (cub.teacher.model, cub.student.model) == ("resnet34", "resnet20_transfer")
  assert cub.student.schedule.boundaries == (10000, 20000)
  assert cub.student.schedule.num_steps == 30000
  # One FSP pair per section: 4 for the 4-section ImageNet ResNets.
  names = models.create_model("resnet20_transfer", 200).feature_names
  assert methods.build_objective(methods.FSP, cub, names).fsp_pairs == (
      ("stem", "section1"), ("section1", "section2"), ("section2", "section3"),
      ("section3", "section4"))
  assert [s.name for s in stages.plan_stages(cub)] == [
      "teacher", "fsp", "student", "fitnet_hint", "fitnet", "scratch"]
  teacher = config_lib.load("transfer_demo:teacher")
  assert teacher.teacher_only and teacher.data.classes == (0, 1, 2, 3, 4)
  student = config_lib.load("transfer_demo")
  assert student.data.classes == (5, 6, 7, 8, 9) and student.data.train_per_class == 100
