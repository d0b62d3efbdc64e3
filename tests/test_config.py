"""Config: inheritance, overrides, YAML round trip, and clear errors for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maescale.config import Config, ConfigError, config_from_dict, load_config, parse_slurm_time

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["base", "vit_base", "vit_large", "vit_huge", "tiny", "demo"])
def test_shipped_configs_load(name):
    path = REPO / "configs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_base_holds_mae_recipe():
    cfg = load_config(REPO / "configs/base.yaml")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.blr == 1.5e-4
    assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss is True
    assert cfg.data.crop_scale == (0.2, 1.0) and cfg.data.interpolation == "bicubic" and cfg.data.hflip_prob == 0.5
    assert cfg.train.precision == "bf16"


def test_inheritance_chain_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {name: mae_vit_base_patch16, mask_ratio: 0.6}\ntrain: {max_steps: 10}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {img_size: 112}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text("base: ../b.yaml\noptim: {blr: 1.0e-3}\n")
    cfg = load_config(sub / "c.yaml", ["train.max_steps=20", "model.mask_ratio=0.9", "data.train_shards=[x.tar, y.tar]"])
    assert cfg.model.name == "mae_vit_base_patch16"
    assert cfg.model.img_size == 112  # from b
    assert cfg.model.mask_ratio == 0.9  # override beats file
    assert cfg.optim.blr == 1e-3 and cfg.train.max_steps == 20
    assert cfg.data.train_shards == ["x.tar", "y.tar"]
    assert cfg.optim.betas == (0.9, 0.95)  # dataclass default kept


def test_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", ["deepspeed.extra={zero_optimization: {overlap_comm: true}}", "resume=false"])
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["deepspeed"]["extra"] == {"zero_optimization": {"overlap_comm": True}}


def test_resume_accepts_bool_and_path():
    assert config_from_dict({"train": {"max_steps": 1}, "resume": False}).resume is False
    assert config_from_dict({"train": {"max_steps": 1}, "resume": "runs/x/checkpoints/step_00000010"}).resume.endswith("10")


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("model.nmae=x", "model.nmae", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        ("model.mask_ratio=1.0", "model.mask_ratio", "open interval (0, 1)"),
        ("model.mask_ratio=0", "model.mask_ratio", "open interval (0, 1)"),
        ("model.mask_ratio=abc", "model.mask_ratio", "expected float"),
        ("model.img_size=225", "model.img_size", "multiple of the patch size 16"),
        ("model.name=vit_gigantic", "model.name", "mae_vit_base_patch16"),
        ("model.attn_impl=xformers", "model.attn_impl", "one of 'sdpa'"),
        ("optim.blr=-1e-4", "optim.blr", "positive"),
        ("optim.betas=[0.9]", "optim.betas", "list of 2"),
        ("optim.betas=[0.9, 1.5]", "optim.betas", "[0, 1)"),
        ("train.micro_batch_size=0", "train.micro_batch_size", ">= 1"),
        ("train.micro_batch_size=2.5", "train.micro_batch_size", "expected int"),
        ("train.micro_batch_size=true", "train.micro_batch_size", "expected int"),
        ("train.precision=fp16", "train.precision", "'bf16'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "one of 0, 1, 2, 3"),
        ("data.crop_scale=[0.9, 0.2]", "data.crop_scale", "lo <= hi"),
        ("data.hflip_prob=2", "data.hflip_prob", "[0, 1]"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
        ("slurm.time=forever", "slurm.time", "[D-]HH:MM:SS"),
        ("optim.lr=.inf", "optim.lr", "finite"),
        ("model=3", "model", "mapping"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/base.yaml", [override])
    assert info.value.key == key
    assert key in str(info.value) and fragment in str(info.value)


def test_steps_and_epochs_exclusive(tmp_path):
    # Both in the same place (the overrides, or one file) stays an error; so does neither.
    with pytest.raises(ConfigError, match="exactly one of train.max_steps and train.epochs"):
        load_config(REPO / "configs/base.yaml", ["train.max_steps=10", "train.epochs=3"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(REPO / "configs/base.yaml", ["train.epochs=null"])
    both = tmp_path / "both.yaml"
    both.write_text("base: " + str(REPO / "configs/base.yaml") + "\ntrain:\n  max_steps: 5\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(both)


def test_override_of_one_of_steps_and_epochs_replaces_the_other(caplog):
    # configs/vit_huge.yaml sets train.epochs: a smoke test overrides train.max_steps only.
    with caplog.at_level("WARNING", logger="maescale.config"):
        cfg = load_config(REPO / "configs/vit_huge.yaml", ["train.max_steps=100"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (100, None)
    assert "dropping train.epochs=1600" in caplog.text
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.epochs=2"])  # tiny.yaml sets max_steps
    assert (cfg.train.max_steps, cfg.train.epochs) == (None, 2.0)
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.max_steps=7"])  # nothing to drop, no warning
    assert (cfg.train.max_steps, cfg.train.epochs) == (7, None)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "l1.yaml").write_text("base: l2.yaml\n")
    (tmp_path / "l2.yaml").write_text("base: l1.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "l1.yaml")
    (tmp_path / "missing_base.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(tmp_path / "missing_base.yaml")


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "1x=2"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="key=value|dotted key"):
        load_config(REPO / "configs/base.yaml", [bad])


def test_slurm_time_parsing():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("04:00:00") == 240
    assert parse_slurm_time("2-00:00:00") == 2880
    assert parse_slurm_time("1-12") == 2160
    assert parse_slurm_time("30:30") == 31
    for bad in ("", "0", "ab", "1:2:3:4", "-5"):
        with pytest.raises(ValueError):
            parse_slurm_time(bad)
