"""Colour-mode handling shared by the decoder and the shard writer (numpy + PIL, no torch).

Rules: palette images are expanded (with alpha when they have transparency), alpha is composited
over white, 16-bit and 32-bit grayscale are scaled to 8 bits (not clipped), CMYK and other modes
are converted by PIL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def prepare_mode(img: Image.Image) -> Image.Image:
    """Bring a decoded image into a mode PIL can resize and we can turn into RGB cheaply:
    one of RGB, L, RGBA, LA, CMYK. Conversions here run at full size, so only where needed."""
    mode = img.mode
    if mode in ("RGB", "L", "RGBA", "LA", "CMYK"):
        return img
    if mode == "P" or mode == "PA":
        return img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0, 255)
        else:
            arr = np.clip(arr.astype(np.int64) >> 8, 0, 255)  # 16-bit range to 8 bits
        return Image.fromarray(arr.astype(np.uint8), "L")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    return img.convert("RGB")  # RGBX, YCbCr, LAB, HSV, ...


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from a resized image in one of RGB, L, RGBA, LA, CMYK."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "L":
        return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)
    if mode == "CMYK":
        return np.asarray(img.convert("RGB"))
    if mode in ("RGBA", "LA"):
        arr = np.asarray(img)
        color = arr[:, :, :3] if mode == "RGBA" else np.repeat(arr[:, :, :1], 3, axis=2)
        alpha = arr[:, :, -1:].astype(np.uint16)
        out = (color.astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255  # over white
        return out.astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB, with the same rules as the decoder (alpha over white, 16-bit scaled)."""
    if img.mode == "RGB":
        return img
    return Image.fromarray(to_rgb_array(prepare_mode(img)), "RGB")
