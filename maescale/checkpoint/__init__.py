"""Checkpoints: the file format and its atomic save/validate/load (:mod:`.manager`), resume planning
including resizes (:mod:`.resume`), and weights in and out (:mod:`.weights`)."""

from maescale.checkpoint.manager import (FORMAT_VERSION, MANIFEST, TRAINER_STATE, CheckpointError, CheckpointManager,
                                         LoadedState, capture_rng, dir_bytes, file_crc32, is_world_size_independent,
                                         read_trainer_state, restore_rng, validate_checkpoint)
from maescale.checkpoint.resume import ResumePlan, plan_resume, prepare_universal
from maescale.checkpoint.weights import (PretrainedLoad, consolidated_state_dict, load_pretrained_into,
                                         only_encoder_loaded)

__all__ = ["FORMAT_VERSION", "MANIFEST", "TRAINER_STATE", "CheckpointError", "CheckpointManager", "LoadedState",
           "PretrainedLoad", "ResumePlan", "capture_rng", "consolidated_state_dict", "dir_bytes", "file_crc32",
           "is_world_size_independent", "load_pretrained_into", "only_encoder_loaded", "plan_resume",
           "prepare_universal", "read_trainer_state", "restore_rng", "validate_checkpoint"]
