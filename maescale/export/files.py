"""Weights files: reading any ``.pth``/``.safetensors`` state dict (an MAE release file, a timm
state dict, an export), and writing/reading the export's own files with their metadata."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from maescale.export.errors import ExportError

META_KEY = "maescale"  # top-level key (.pth) / header key (.safetensors) holding the metadata
FORMAT_TAG = "maescale-encoder/1"
FORMATS = ("torch", "safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEEPSPEED_HINT = "a DeepSpeed file? Pass its checkpoint directory instead"


def clean_state(state: Any, where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``state`` as a float32 state dict without a ``module.`` prefix; :class:`ExportError` unless
    it is a non-empty mapping of names to tensors."""
    if not isinstance(state, dict) or not state:
        raise ExportError(f"{where}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ExportError(f"{where}: expected a state dict of tensors, but '{k}' holds {type(v).__name__}")
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def read_weights_file(path: Path, deepspeed_hint: str = DEEPSPEED_HINT) -> tuple[dict[str, torch.Tensor], Any]:
    """``(state_dict, metadata or None)`` of a ``.safetensors`` file (flat; metadata from its
    header) or a torch file holding ``{"model": state_dict, ...}`` (the MAE release, exports) or a
    flat state dict (``torch.save(model.state_dict())``). Tensors only: torch files are read with
    ``weights_only=True``. ``deepspeed_hint`` ends the message when the file looks like one of
    DeepSpeed's (it says what to pass instead)."""
    meta: Any = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        if META_KEY in header:
            try:
                meta = json.loads(header[META_KEY])
            except json.JSONDecodeError:
                meta = None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ExportError(f"{path} is not a readable torch checkpoint: it holds Python objects besides tensors, "
                              f"which are not loaded (weights_only=True); {deepspeed_hint}") from None
        except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file ...
            raise ExportError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            state, meta = obj["model"], obj.get(META_KEY)
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            hint = f"; {deepspeed_hint}" if "module" in keys else ""
            raise ExportError(f"{path}: expected {{'model': state_dict}} (MAE names), found {keys}{hint}")
    return clean_state(state, path), meta


def sidecar_path(output: str | os.PathLike) -> Path:
    """``FILE.json`` beside ``FILE``."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def pick_format(output: Path, fmt: str | None) -> str:
    """``torch`` or ``safetensors``: by extension unless given; they must agree, since timm
    (``load_checkpoint``) chooses its reader by the ``.safetensors`` extension."""
    is_st = output.suffix == ".safetensors"
    if fmt is None:
        return "safetensors" if is_st else "torch"
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (fmt == "safetensors") != is_st:
        raise ExportError(f"format={fmt} but the output is named '{output.name}': timm reads a file as safetensors "
                          "exactly when its name ends in .safetensors; rename the output or drop --format")
    return fmt


def save_encoder(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str) -> None:
    """Write ``tensors`` and ``meta`` in ``fmt`` (no atomicity here: see
    :func:`maescale.export.export_encoder`)."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    else:
        torch.save({"model": tensors, META_KEY: meta}, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates files 0600; give both formats the usual mode


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a file written by :func:`maescale.export.export_encoder`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return state, json.loads(header.get(META_KEY, "{}"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["model"], obj.get(META_KEY, {})
