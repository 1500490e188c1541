"""Decoding one image file (any common mode, EXIF orientation) and resizing image tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor


def image_to_array(img: Image.Image) -> npt.NDArray[np.float32]:
    """Convert a PIL image of any common mode to float32 RGB (H, W, 3) in [0, 1].

    Pillow's own ``convert("RGB")`` clips 16- and 32-bit integer images to 255, so those are scaled here:
    ``I;16*`` by 1/65535; ``I`` by 1/65535 when its values fit in 16 bits (how 16-bit PNG and TIFF arrive),
    else by its own min and max; ``F`` is kept when in [0, 1], else min-max scaled. Transparency (RGBA, LA, PA
    and palettes with a transparent entry) is composited onto white, as image viewers show it.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        gray = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        gray = _scaled(raw, 65535.0 if raw.size and raw.min() >= 0 and raw.max() <= 65535 else None)
    elif mode == "F":
        raw32 = np.asarray(img, dtype=np.float32)
        if not np.isfinite(raw32).all():
            raise ValueError("float image holds NaN or infinite values")
        gray = raw32 if raw32.size and raw32.min() >= 0 and raw32.max() <= 1 else _scaled(raw32, None)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return np.ascontiguousarray(rgba[..., :3] * alpha + (1.0 - alpha))
    elif mode in ("1", "L"):
        gray = np.asarray(img, dtype=np.float32) / (1.0 if mode == "1" else 255.0)
    else:  # RGB, P, CMYK, YCbCr, LAB, HSV
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)


def _scaled(raw: npt.NDArray[Any], full_scale: float | None) -> npt.NDArray[np.float32]:
    """Divide by full_scale, or min-max scale to [0, 1] when it is None (a constant image gives zeros)."""
    if full_scale is not None:
        return (raw / full_scale).astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    return ((raw - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def load_image(path: Path, img_size: int) -> Tensor:
    """Read one image file as float32 (3, img_size, img_size) in [0, 1], upright per its EXIF orientation."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(None, (img_size, img_size))  # let libjpeg decode at a reduced scale: large photos
        upright = ImageOps.exif_transpose(img)
        array = image_to_array(upright)  # (H, W, 3)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError("image has no pixels")
    chw = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return resize(chw, img_size)[0]


def resize(images: Tensor, img_size: int) -> Tensor:
    """Bicubic resize of float (N, C, H, W) in [0, 1] to (N, C, S, S), clamped back to [0, 1].

    Antialiased when shrinking (as PIL does); bicubic overshoot is clamped so ``none`` stays in [0, 1].
    """
    height, width = images.shape[-2:]
    if height == width == img_size:
        return images.clamp(0.0, 1.0)
    shrink = height > img_size or width > img_size
    out = F.interpolate(images, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp_(0.0, 1.0)
