"""Weighted k-nearest-neighbour classification of features (DINO's kNN evaluation) and the
accuracy measures shared by the probes.

DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", Sec. 4.1 /
``eval_knn.py``): features are L2-normalised; each test feature votes with its ``k`` most similar
training features (cosine similarity ``s``), neighbour ``i`` voting for its class with weight
``exp(s_i / T)``; classes are ranked by their summed votes. Defaults ``k = 20``, ``T = 0.07``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_rank_classes(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                     chunk: int = 1024) -> torch.Tensor:
    """``(N_test, num_classes)`` class indices of every test feature, best first (weighted kNN
    on L2-normalised features; see the module docstring). ``k`` is capped at the bank size."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("the kNN memory bank (train features) is empty")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = test_feats.device
    bank = F.normalize(train_feats.float().to(device), dim=1)
    bank_labels = train_labels.to(device)
    k = min(k, bank.shape[0])
    ranked = []
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (b, k) most similar bank entries
        votes = torch.zeros(query.shape[0], num_classes, device=device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        # stable: equal votes keep class order, so results are reproducible
        ranked.append(torch.argsort(votes, dim=1, descending=True, stable=True))
    return torch.cat(ranked) if ranked else torch.zeros(0, num_classes, dtype=torch.int64, device=device)


@dataclass
class Accuracy:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of ranked predictions, and per class."""

    top1: float
    top5: float
    n: int
    per_class: dict[int, float]  # class -> top-1 accuracy on its test samples
    top5_k: int  # min(5, number of classes): "top-5" with fewer classes is top-(classes)

    def to_json(self, names: list[str] | None = None, per_class: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"top1": self.top1, "top5": self.top5, "n": self.n}
        if self.top5_k != 5:
            out["top5_is_top"] = self.top5_k
        if per_class:
            out["per_class_top1"] = {(names[c] if names and c < len(names) else str(c)): acc
                                     for c, acc in sorted(self.per_class.items())}
        return out


def accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """Accuracy of ``ranked`` ``(N, C)`` class rankings against ``labels`` ``(N,)``."""
    labels = labels.to(ranked.device)
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no test samples to score")
    k5 = min(5, ranked.shape[1])
    hit1 = ranked[:, 0] == labels
    hit5 = (ranked[:, :k5] == labels[:, None]).any(dim=1)
    per_class = {int(c): float(hit1[labels == c].float().mean()) for c in torch.unique(labels).tolist()}
    return Accuracy(top1=float(hit1.float().mean()), top5=float(hit5.float().mean()), n=n,
                    per_class=per_class, top5_k=k5)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int | None = None, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> Accuracy:
    """Weighted kNN accuracy of ``test_feats`` against the bank ``train_feats``."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ranked = knn_rank_classes(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return accuracy(ranked, test_labels)
