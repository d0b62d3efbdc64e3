"""Linear probing as in the MAE paper (He et al. 2021, Appendix A.1 "Linear probing", Table 10),
on features extracted once from the frozen encoder.

The classifier is ``BatchNorm1d(D, affine=False, eps=1e-6)`` followed by ``Linear(D, classes)``
(weight ~ truncated N(0, 0.01), bias 0): the paper normalises the pre-trained features with a
BatchNorm without affine transformation before the linear layer (a re-parameterised linear
classifier). Recipe of Table 10: LARS, base lr 0.1 (lr = base lr x batch / 256), weight decay 0,
momentum 0.9, batch 16384, 10 warmup epochs then cosine decay, 90 epochs; "SGD works similarly
with a 4096 batch". One deliberate difference: the paper trains on RandomResizedCrop views,
here the features of the centre crop are computed once and reused every epoch (the issue's
"features cached once"), which is cheaper and deterministic and typically scores a little lower.

LARS (You et al. 2017, as used by MoCo v3 and the MAE release): for every weight with more than
one dimension the update ``g + wd * w`` is rescaled by the trust ratio ``eta * |w| / |g + wd * w|``
(eta = 0.001; 1 where a norm is 0); biases and other 1-D parameters get the plain update; then
heavy-ball momentum ``m <- mu * m + update``, ``w <- w - lr * m``.

The lr follows the release's per-iteration schedule: linear warmup over ``warmup_epochs``, then
a half-cycle cosine to ``min_lr`` at the end of the last epoch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from maescale.probe.knn import Accuracy, accuracy

log = logging.getLogger(__name__)

PAPER_STEPS = 90 * (1_281_167 // 16384)  # the paper's ImageNet schedule: 90 epochs x 78 steps


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (see the module docstring); no trust ratio or weight
    decay for parameters with at most one dimension."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"bad LARS settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                             f"trust_coefficient={trust_coefficient}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return None


@dataclass
class LinearProbeConfig:
    """Settings of :func:`train_linear_probe`; defaults are the MAE paper's Table 10."""

    optimizer: Literal["lars", "sgd"] = "lars"
    epochs: int = 90
    batch_size: int = 16384
    blr: float = 0.1  # base lr: lr = blr * batch / 256 (unless lr is set)
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.optimizer not in ("lars", "sgd"):
            problems.append(f"optimizer must be 'lars' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if (self.lr if self.lr is not None else self.blr) <= 0:
            problems.append(f"the learning rate must be positive (lr={self.lr}, blr={self.blr})")
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(f"warmup epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.min_lr < 0 or not 0 <= self.momentum < 1:
            problems.append(f"need weight_decay >= 0, min_lr >= 0, 0 <= momentum < 1 (got {self.weight_decay}, "
                            f"{self.min_lr}, {self.momentum})")
        if problems:
            raise ValueError("linear probe: " + "; ".join(problems))


@dataclass
class LinearProbeResult:
    """Validation accuracy of the trained classifier and how it was trained."""

    val: Accuracy
    train_top1: float
    final_loss: float
    steps: int
    lr: float
    batch_size: int
    config: LinearProbeConfig

    def to_json(self, names: list[str] | None = None, per_class: bool = True) -> dict[str, Any]:
        return {**self.val.to_json(names, per_class), "train_top1": self.train_top1, "final_loss": self.final_loss,
                "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "config": asdict(self.config)}


def lr_at(epoch: float, peak: float, cfg: LinearProbeConfig) -> float:
    """Warmup then half-cycle cosine, as a function of the (fractional) epoch."""
    if epoch < cfg.warmup_epochs:
        return peak * epoch / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def make_classifier(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """``BatchNorm1d(dim, affine=False, eps=1e-6)`` + ``Linear`` (weight ~ trunc. N(0, 0.01), bias 0)."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(nn.init.trunc_normal_(torch.empty(num_classes, dim), std=0.01, a=-0.02, b=0.02,
                                                generator=generator))
        head.bias.zero_()
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, cfg: LinearProbeConfig | None = None) -> LinearProbeResult:
    """Train the classifier on ``train_x`` (features, frozen) and score it on ``val_x``.

    Runs on the features' device; deterministic on CPU for a given ``cfg.seed``. The batch is
    ``min(cfg.batch_size, len(train_x))`` and the last incomplete batch of an epoch is dropped
    (as the release's loader does)."""
    cfg = cfg or LinearProbeConfig()
    cfg.check()
    n, dim = train_x.shape
    if n < 2:
        raise ValueError(f"linear probe: need at least 2 training samples, got {n}")
    device = train_x.device
    gen = torch.Generator().manual_seed(cfg.seed)
    model = make_classifier(dim, num_classes, gen).to(device)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    peak = cfg.lr if cfg.lr is not None else cfg.blr * batch / 256
    params = list(model.parameters())
    opt: torch.optim.Optimizer
    if cfg.optimizer == "lars":
        opt = LARS(params, lr=peak, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        opt = torch.optim.SGD(params, lr=peak, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    if cfg.optimizer == "lars" and total < PAPER_STEPS // 4:
        # LARS moves each weight matrix by about lr x 0.001 x |w| per step: the paper's ~7000 steps
        # at lr 6.4 converge, a few hundred small steps leave the classifier near its initialisation.
        log.warning("linear probe: LARS with only %d steps (%d samples, batch %d, %d epochs, lr %.3g) may not "
                    "converge; the paper's recipe runs %d steps on ImageNet. On a small set use --optimizer sgd "
                    "(the paper: 'SGD works similarly'), or more epochs / a higher --blr", total, n, batch,
                    cfg.epochs, peak, PAPER_STEPS)
    loss_fn = nn.CrossEntropyLoss()
    train_x, train_y = train_x.float(), train_y.to(device)
    loss = torch.zeros(())
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch + i / steps_per_epoch, peak, cfg)
            idx = perm[i * batch:(i + 1) * batch]
            loss = loss_fn(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        val_logits = torch.cat([model(val_x[i:i + 8192].float()) for i in range(0, val_x.shape[0], 8192)])
        train_pred = torch.cat([model(train_x[i:i + 8192]).argmax(1) for i in range(0, n, 8192)])
    ranked = torch.argsort(val_logits, dim=1, descending=True, stable=True)
    return LinearProbeResult(val=accuracy(ranked, val_y), train_top1=float((train_pred == train_y).float().mean()),
                             final_loss=float(loss.detach()), steps=total, lr=peak, batch_size=batch, config=cfg)
