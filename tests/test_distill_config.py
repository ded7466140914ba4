"""Run config validation, config.yaml round trip, the DeepSpeed accelerate config."""

import dataclasses
import importlib.util
import sys

import pytest
import yaml
from distill_helpers import RING8, ROOT, run, tiny_cfg

from distill.engine.config import ConfigError
from distill.engine.run_config import load_run_config


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": 1e-3}, r"unknown config key\(s\) learning_rate; allowed under the top level: .*batch_size"),
    ({"student": {"archh": "mlp"}}, r"unknown config key\(s\) student.archh; allowed under student: arch, "),
    ({"student": {"arch": "transformer"}}, "config key 'student.arch' is 'transformer'; allowed: teacher, mlp, unet"),
    ({"batch_size": "big"}, "config key 'batch_size' must be of type int, got 'big'"),
    ({"max_steps": 0}, "config key 'max_steps' must be at least 1, got 0"),
    ({"ema_decay": 1.5}, "config key 'ema_decay' must be at most 1.0, got 1.5"),
    ({"mixed_precision": "fp8"}, "config key 'mixed_precision' is 'fp8'; allowed: null, no, fp16, bf16"),
    ({"objective": {"name": "dmd3"}}, "config key 'objective.name' is 'dmd3'; allowed: .*consistency.*dmd2"),
    ({"objective": {"name": "consistency", "num_scale": 4}}, r"unknown config key\(s\) objective.num_scale; allowed under objective"),
    ({"objective": {"name": "consistency", "solver": "rk45"}}, "config key 'objective.solver' is 'rk45'; allowed: .*heun"),
    ({"objective": {"name": "consistency", "distance": "lpips"}}, "allowed: l2, pseudo_huber, huber"),
    ({"lora": {"rank": 0}}, "config key 'lora.rank' must be at least 1"),
    ({"teacher": ""}, "config key 'teacher' is required"),
])
def test_bad_configs_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(RING8, overrides)


def test_defaults_are_filled_in_and_config_yaml_round_trips(tmp_path):
    cfg = tiny_cfg(tmp_path / "r", "max_steps=2")
    assert cfg.objective["solver"] == "heun" and cfg.objective["huber_c"] is None and cfg.student.arch == "mlp"
    run(cfg)
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert load_run_config(tmp_path / "r" / "config.yaml") == cfg and saved["objective"]["num_scales"] == 6


def test_tensorboard_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="'tensorboard' is true but the tensorboard package is not installed"):
        run(tiny_cfg(tmp_path / "tb", "tensorboard=true"))
    assert not (tmp_path / "tb").exists()  # failed before any work


def test_cli_reports_config_errors_in_one_line(capsys):
    spec = importlib.util.spec_from_file_location("distill_cli", ROOT / "scripts" / "distill.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(RING8), "--set", "student.arch=gan"]) == 1
    assert capsys.readouterr().err.strip() == "error: config key 'student.arch' is 'gan'; allowed: teacher, mlp, unet, toy_mlp"


def test_deepspeed_zero2_accelerate_config_is_valid():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DeepSpeedPlugin

    path = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in dataclasses.fields(ClusterConfig)}
    assert set(raw["deepspeed_config"]) <= set(DeepSpeedPlugin.__dataclass_fields__)
    assert raw["distributed_type"] == "DEEPSPEED" and raw["deepspeed_config"]["zero_stage"] == 2
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.deepspeed_config["gradient_clipping"] == 1.0 and cfg.mixed_precision == "bf16"


DISTILL_CONFIGS = sorted((ROOT / "configs" / "distill").glob("*.yaml"))


def test_the_mnist16_configs_of_issues_15_and_16_exist():
    names = {p.name for p in DISTILL_CONFIGS}
    assert {"progressive_mnist16.yaml", "reflow_mnist16.yaml", "slam_mnist16.yaml", "cd_mnist16_w.yaml",
            "slam_mnist16_w.yaml"} <= names


@pytest.mark.parametrize("path", DISTILL_CONFIGS, ids=lambda p: p.name)
def test_every_distill_config_loads_and_validates(path):
    """Every shipped configs/distill/*.yaml passes the run config's validation (keys, types, ranges and the
    objective's own options), and its objective section names its objective."""
    cfg = load_run_config(path)
    assert cfg.objective["name"] == yaml.safe_load(path.read_text())["objective"]["name"]


# -- each objective's reference optimizer is its default --------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [
    ("sid_ring8.yaml", ((0.0, 0.999), 0.0)),  # SiD's released sid_train.py: Adam betas (0, 0.999) for both networks
    ("uni_instruct_aniso2d.yaml", ((0.0, 0.999), 0.0)),  # Uni-Instruct, on SiD's code: the same
    ("dmd2_ring8.yaml", ((0.9, 0.999), 0.01)),  # DMD2's train_edm.py: AdamW (0.9, 0.999), weight decay 0.01
    ("fdistill_aniso2d.yaml", ((0.9, 0.999), 0.01)),  # FastGen's default optimizer: the same
    ("vsd_ring8.yaml", ((0.0, 0.999), 0.0)),  # Diff-Instruct's di_train.py: Adam betas [0.0, 0.999]
    ("cd_ring8.yaml", ((0.9, 0.999), 0.0)),  # no reference declared: Adam's defaults
])
def test_each_objective_trains_with_its_reference_betas_unless_the_config_sets_them(tmp_path, config, expected):
    from distill.engine.run_setup import resolve_settings
    from distill.engine.train import start
    from students import build_student
    from teachers import load_teacher

    def betas_of(cfg):
        run_, _ = start(cfg, load_teacher=load_teacher, build_student=build_student, resume=None, log=lambda m: None)
        found = {spec.name: (resolve_settings(cfg, spec).betas, resolve_settings(cfg, spec).weight_decay)
                 for spec in run_.objective.networks()}
        optimizers = {name: (tuple(opt.param_groups[0]["betas"]), opt.param_groups[0]["weight_decay"])
                      for name, opt in run_.opts.items()}
        assert found == optimizers
        return found

    from distill.engine.config import parse_overrides

    def cfg(out, *extra):
        return load_run_config(ROOT / "configs" / "distill" / config, parse_overrides(["max_steps=1", f"output_dir={out}", *extra]))

    default = betas_of(cfg(tmp_path / "a"))
    assert set(default.values()) == {expected}
    chosen = betas_of(cfg(tmp_path / "b", "optim.betas=[0.5,0.99]", "optim.weight_decay=0.002"))  # the config's values win
    assert set(chosen.values()) == {((0.5, 0.99), 0.002)}


def test_reflow_distance_defaults_to_rectified_diffusions_huber():
    """Rectified Diffusion's train.py: mean over elements of sqrt(d^2 + c^2) - c, c = 0.001, on the x0 error; raw: l2."""
    import math

    import torch

    from distill.objectives.losses import distance

    a, b = torch.tensor([[0.0, 0.5, -2.0]]), torch.zeros(1, 3)
    want = sum(math.sqrt(v * v + 1e-6) - 1e-3 for v in (0.0, 0.5, -2.0)) / 3
    assert math.isclose(float(distance(a, b, "huber")), want, rel_tol=1e-6)
    assert not math.isclose(float(distance(a, b, "pseudo_huber")), want, rel_tol=1e-2)  # the vector form differs
    from distill.objectives import get_objective

    assert get_objective("reflow").Options().distance is None  # resolved by the objective: huber (x0) / l2 (raw)
