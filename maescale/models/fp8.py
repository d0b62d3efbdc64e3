"""FP8 training of the encoder's linear layers (``model.fp8``), with torchao's float8 training.

``convert_to_fp8`` swaps the chosen ``nn.Linear`` modules for torchao's ``Float8Linear``: their
GEMMs (forward, grad-input, grad-weight) run in float8 with dynamic scales (``tensorwise``: one
scale per tensor, cuBLAS; ``rowwise``: one per row, CUTLASS, power-of-two scales), while the
weights stay ordinary bf16/fp32 parameters under the same names. Checkpoints, exact resume,
export and the probe therefore see the same state dict as without FP8 (checked at conversion).

Which layers (:func:`fp8_layer_rule`, one rule for the model and for config validation):

* encoder blocks only (``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). The
  decoder stays bf16: its width is 512 for every preset, so each of its GEMMs has an inner or
  outer dimension of 512, where the per-tensor casts (an amax reduction and a cast of input,
  weight and gradient, each a pass over memory) cost about as much as the halved GEMM time saves;
  torchao's own H100 heuristics leave such shapes in bf16 too. It is also the smaller part of the
  work (ViT-H: about 15% of the forward FLOPs, :mod:`maescale.flops`) and it makes the pixel
  predictions that the loss reads.
  ``decoder_embed`` belongs to the decoder; ``patch_embed`` is a convolution, not a linear layer.
* both ``in_features`` and ``out_features`` multiples of 16 (what FP8 GEMMs accept; e.g.
  ``decoder_pred``'s 588 outputs for patch 14 are not);
* both at least ``model.fp8_min_features`` (default :data:`FP8_MIN_FEATURES`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

FP8_RECIPES = ("tensorwise", "rowwise")
FP8_DIM_MULTIPLE = 16  # FP8 GEMMs (torch._scaled_mm) need K and N divisible by 16
# The smallest in/out feature count converted. A placeholder until measured: it must be set from a
# per-shape GPU measurement (bf16 vs FP8 time of each encoder linear at the loop's token counts,
# `fp8-shapes` in bench/gpu_check.sh), which does not exist yet. 1024 keeps ViT-L/H/g encoders in
# FP8 and ViT-B's (width 768) in bf16, as torchao's H100 heuristics would for most of ViT-B's shapes.
FP8_MIN_FEATURES = 1024
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ENCODER_LINEAR = re.compile(r"^blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")


class FP8UnavailableError(ValueError):
    """``model.fp8`` cannot run here (no torchao, no FP8 hardware, or FP8 GEMMs failing): bad input
    for this machine, reported by the CLI as an error naming the key."""


def fp8_recipe(value: Any) -> str | None:
    """The recipe that the config value ``model.fp8`` names, or None for off (``off``/``false``)."""
    if value in (None, False, "off"):
        return None
    if value not in FP8_RECIPES:
        raise ValueError(f"model.fp8 must be off, {' or '.join(FP8_RECIPES)}; got {value!r}")
    return value


@dataclass(frozen=True)
class LinearPlan:
    """One linear layer of the model and whether (and why not) it runs in FP8."""

    name: str
    in_features: int
    out_features: int
    fp8: bool
    reason: str  # "fp8", or why it stays in high precision


def fp8_layer_rule(name: str, in_features: int, out_features: int, min_features: int) -> str:
    """``"fp8"`` when linear ``name`` (in -> out features) is converted, else why it is not."""
    if not ENCODER_LINEAR.match(name):
        return "not an encoder block linear (decoder and embeddings stay in high precision)"
    if in_features % FP8_DIM_MULTIPLE or out_features % FP8_DIM_MULTIPLE:
        return f"{in_features}x{out_features} is not a multiple of {FP8_DIM_MULTIPLE} (FP8 GEMMs need it)"
    if min(in_features, out_features) < min_features:
        return f"{in_features}x{out_features} is below model.fp8_min_features={min_features}"
    return "fp8"


def planned_linears(arch: Any, img_size: int = 224, in_chans: int = 3) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every ``nn.Linear`` that a preset's model has, from its
    :class:`~maescale.models.presets.MAEArch` alone (no torch: config validation uses it)."""
    e, d = arch.embed_dim, arch.decoder_embed_dim
    out = []
    for prefix, width, depth in (("blocks", e, arch.depth), ("decoder_blocks", d, arch.decoder_depth)):
        hidden = int(width * arch.mlp_ratio)
        if prefix == "decoder_blocks":
            out.append(("decoder_embed", e, d))
        for i in range(depth):
            out += [(f"{prefix}.{i}.attn.qkv", width, 3 * width), (f"{prefix}.{i}.attn.proj", width, width),
                    (f"{prefix}.{i}.mlp.fc1", width, hidden), (f"{prefix}.{i}.mlp.fc2", hidden, width)]
    out.append(("decoder_pred", d, arch.patch_size ** 2 * in_chans))
    return out


def fp8_plan(arch: Any, min_features: int | None = None, in_chans: int = 3) -> list[LinearPlan]:
    """Every linear layer of a preset with the rule's verdict (see the module docstring)."""
    m = FP8_MIN_FEATURES if min_features is None else min_features
    return [LinearPlan(n, i, o, (r := fp8_layer_rule(n, i, o, m)) == "fp8", r)
            for n, i, o in planned_linears(arch, in_chans=in_chans)]


def module_filter(min_features: int | None = None) -> Callable[[Any, str], bool]:
    """torchao's ``module_filter_fn``: True for the ``nn.Linear`` modules the rule converts."""
    from torch import nn

    m = FP8_MIN_FEATURES if min_features is None else min_features

    def keep(mod: Any, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and fp8_layer_rule(fqn, mod.in_features, mod.out_features, m) == "fp8"

    return keep


def hardware_problem(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why FP8 GEMMs cannot run on this device (None when they can): a CUDA GPU of compute
    capability >= 8.9 is needed."""
    if device_type != "cuda":
        return f"it needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9), the device is {device_type}"
    if capability is None or tuple(capability) < FP8_MIN_CAPABILITY:
        cap = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return (f"this GPU has compute capability {cap}; FP8 GEMMs need >= 8.9 (Ada L4/L40/RTX 4090, Hopper "
                "H100/H200, Blackwell)")
    return None


def _torchao():
    """torchao's float8 training API, or a clear error naming the key and the fix."""
    import torch

    from maescale import compat

    if not compat.has_scaled_mm():
        raise FP8UnavailableError(f"model.fp8 needs torch with float8 dtypes and torch._scaled_mm; torch "
                                  f"{torch.__version__} has not. Set model.fp8=off")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        Float8Linear = compat.float8_linear_class()
    except ImportError as exc:
        raise FP8UnavailableError(f"model.fp8 needs torchao's float8 training (pip install 'maescale[fp8]', "
                                  f"torchao>=0.18): {exc}. Or set model.fp8=off") from None
    if not any(f.name == "emulate" for f in dataclasses.fields(Float8LinearConfig)):
        raise FP8UnavailableError("model.fp8: this torchao's Float8LinearConfig has no 'emulate' field; "
                                  "install torchao>=0.18 (pip install 'maescale[fp8]')")
    return Float8LinearConfig, convert_to_float8_training, Float8Linear


def float8_config(recipe: str, emulate: bool) -> Any:
    """torchao's ``Float8LinearConfig`` of a recipe; ``emulate``: matmuls in high precision on the
    FP8-rounded values (any device; for tests, not for speed)."""
    config_cls, _, _ = _torchao()
    cfg = config_cls.from_recipe_name(recipe)
    return dataclasses.replace(cfg, emulate=True) if emulate else cfg


def check_fp8_support(recipe: str, device: Any, emulate: bool) -> None:
    """Raise :class:`FP8UnavailableError` (naming ``model.fp8``) unless ``recipe`` can train here:
    torchao present, FP8 hardware (or emulation), and one small FP8 linear forward + backward on
    the device succeeding (what a GEMM kernel refuses shows up here, at start-up, not mid-run)."""
    import torch

    device = torch.device(device or "cpu")
    _torchao()
    if not emulate:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        problem = hardware_problem(device.type, cap)
        if problem:
            hint = "model.fp8_emulate=true (slow; for tests)" if device.type != "cuda" else "model.fp8=off"
            raise FP8UnavailableError(f"model.fp8={recipe}: {problem}. Set {hint}")
    try:
        # The probe draws random numbers: on forked generators, so that a run with FP8 draws the same
        # initial weights, masks and data as one without.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _probe(recipe, device, emulate)
    except FP8UnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the kernels refuse, named with the key
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise FP8UnavailableError(f"model.fp8={recipe}: a float8 linear layer fails on {device}: "
                                  f"{type(exc).__name__}: {first}. Set model.fp8=off") from exc


def _probe(recipe: str, device: Any, emulate: bool) -> None:
    import torch

    _, convert, _ = _torchao()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lin = torch.nn.Sequential(torch.nn.Linear(32, 32, device=device, dtype=dtype))
    convert(lin, config=float8_config(recipe, emulate))
    x = torch.randn(16, 32, device=device, dtype=dtype, requires_grad=True)
    lin(x).float().square().mean().backward()
    if not (torch.isfinite(x.grad).all() and torch.isfinite(lin[0].weight.grad).all()):
        raise FP8UnavailableError(f"model.fp8={recipe}: a float8 linear layer gives non-finite gradients on {device}")


def convert_to_fp8(model: Any, recipe: str, emulate: bool = False, min_features: int | None = None,
                   device: Any = None) -> list[str]:
    """Swap the rule's linear layers of ``model`` for torchao ``Float8Linear`` in place; returns
    their names. Parameter names, shapes and dtypes are unchanged (checked)."""
    check_fp8_support(recipe, device, emulate)
    _, convert, float8_linear = _torchao()
    before = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    keep = module_filter(min_features)
    wanted = [n for n, m in model.named_modules() if keep(m, n)]
    if not wanted:
        raise FP8UnavailableError(f"model.fp8={recipe}: no linear layer of this model passes the FP8 rule "
                                  "(see maescale.models.fp8); lower model.fp8_min_features or set model.fp8=off")
    convert(model, module_filter_fn=keep, config=float8_config(recipe, emulate))
    done = [n for n, m in model.named_modules() if isinstance(m, float8_linear)]
    after = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if done != wanted or after != before:  # a torchao change of behaviour, not a user error
        raise RuntimeError(f"FP8 conversion changed the model beyond the chosen layers: converted {done[:4]}..., "
                           f"state dict {'unchanged' if after == before else 'changed'}")
    kept = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
    log.info("model.fp8=%s%s: %d linear layers in float8 (encoder blocks), %d kept in high precision (%s)",
             recipe, " (emulated)" if emulate else "", len(done), len(kept), ", ".join(kept[:4]) +
             (", ..." if len(kept) > 4 else ""))
    return done
