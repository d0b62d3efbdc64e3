"""Is the encoder getting better? kNN and linear-probe evaluation of MAE encoders.

One concern per module:

* :mod:`.data`: labelled (``.cls``) shards, train/val splits (two shard sets or a seeded
  hold-out), the work shared over processes, MAE's centre-crop eval transform;
* :mod:`.features`: ``cls`` and ``avgpool`` encoder features, extracted per process and
  all-gathered into one global order;
* :mod:`.knn`: DINO's weighted kNN and the accuracy measures;
* :mod:`.linear`: the MAE paper's linear probe (BatchNorm without affine + linear, LARS or SGD);
* :mod:`.evaluator`: the in-loop kNN evaluation (``eval:`` config section);
* :mod:`.run`: the offline probe behind ``tools/probe.py``.
"""

from maescale.probe.data import CenterCropTransform, Split, make_splits
from maescale.probe.evaluator import Evaluator, build_evaluator, comparison_line, history_path, read_history
from maescale.probe.features import FEATURE_KINDS, Features, encoder_features, extract_features
from maescale.probe.knn import Accuracy, knn_accuracy, knn_rank_classes
from maescale.probe.linear import LARS, LinearProbeConfig, train_linear_probe
from maescale.probe.run import ProbeOptions, format_history, format_table, probe_encoder

__all__ = ["FEATURE_KINDS", "LARS", "Accuracy", "CenterCropTransform", "Evaluator", "Features", "LinearProbeConfig",
           "ProbeOptions", "Split", "build_evaluator", "comparison_line", "encoder_features", "extract_features",
           "format_history", "format_table", "history_path", "knn_accuracy", "knn_rank_classes", "make_splits",
           "probe_encoder", "read_history", "train_linear_probe"]
