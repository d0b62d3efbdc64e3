"""Typed configuration: dataclasses, YAML files with ``base:`` inheritance, dotted overrides.

One :class:`Config` object flows through the whole program; each module takes the section it
needs. Loading validates everything up front (unknown keys, wrong types, impossible values) and
raises :class:`ConfigError` naming the key, the value and what is allowed, so that a typo fails
on the login node rather than hours later in the queue.

Example::

    cfg = load_config("configs/vit_huge.yaml", ["train.max_steps=100", "deepspeed.zero_stage=2"])
"""

from maescale.config.load import (apply_overrides, config_from_dict, deep_merge, load_config, load_yaml_with_bases,
                                  parse_override, set_dotted)
from maescale.config.schema import (IMAGENET_MEAN, IMAGENET_STD, CheckpointConfig, Config, ConfigError, DataConfig,
                                    DeepSpeedConfig, DistributedConfig, EvalConfig, LockConfig, ModelConfig, OptimConfig,
                                    SlurmConfig, TrainConfig)
from maescale.config.validate import (MAX_AUTO_WORKERS, lean_step_applies, parse_slurm_time, resolve_num_workers,
                                      validate)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_AUTO_WORKERS", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DeepSpeedConfig", "DistributedConfig", "EvalConfig", "LockConfig", "ModelConfig", "OptimConfig",
           "SlurmConfig", "TrainConfig", "apply_overrides", "config_from_dict", "deep_merge", "lean_step_applies",
           "load_config", "load_yaml_with_bases", "parse_override", "parse_slurm_time", "resolve_num_workers",
           "set_dotted", "validate"]
