"""Decoding images of any PIL mode to 8-bit RGB or L, with a recorded reason when a file cannot be read.

Conversions that plain ``Image.convert('RGB')`` gets wrong are handled explicitly: 16-bit and 32-bit integer images are
*scaled* to 8 bit (``convert`` clips them to 255, turning most of a 16-bit image white), float images in [0, 1] are
scaled to [0, 255], and transparent images (LA, RGBA, PA, P with a transparency key) are composited over a white
background instead of revealing whatever colour the transparent pixels happen to store.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

logger = logging.getLogger("beitv2.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ALPHA_BACKGROUND = (255, 255, 255)


class BadImageError(Exception):
    """A file could not be decoded; ``str(e)`` is the reason reported to the user."""


def _scale_int(arr: np.ndarray, max_value: int) -> Image.Image:
    arr = np.clip(arr.astype(np.int64), 0, max_value)
    return Image.fromarray(((arr * 255 + max_value // 2) // max_value).astype(np.uint8))


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Integer and float single-channel modes to 'L' by scaling (16-bit: x * 255 / 65535, rounded)."""
    if img.mode.startswith("I;16"):
        return _scale_int(np.asarray(img), 65535)
    if img.mode == "I":
        # 32-bit int images from PIL are almost always 16-bit data (PNG/TIFF uint16 in older PIL); values are read
        # on the 16-bit scale, which also keeps one file's brightness independent of its content.
        return _scale_int(np.asarray(img), 65535)
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:  # the common [0, 1] float convention
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.convert("L")


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def convert_image(img: Image.Image, channels: int = 3) -> Image.Image:
    """Any PIL image to 'RGB' (channels=3) or 'L' (channels=1)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in img.info:
        img = _composite(img)
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: str | os.PathLike | bytes | BinaryIO, channels: int = 3) -> Image.Image:
    """Open, fully decode and convert one image; raises `BadImageError` with the reason on any failure."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as img:
            img.load()  # decode now: truncated or corrupt data fails here, not later inside a transform
            return convert_image(img, channels)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise BadImageError(reason) from e


def report_bad(path: str, reason: str) -> None:
    logger.warning("skipping unreadable image %s: %s", path, reason)


class BadFileLog:
    """Mixin: ``bad_files``, the (path, reason) pairs met in this process, each path once."""

    def _init_bad(self) -> None:
        self.bad_files: list[tuple[str, str]] = []
        self._bad_seen: set[str] = set()

    def _record_bad(self, path: str, reason: str) -> None:
        report_bad(path, reason)
        if path not in self._bad_seen:
            self._bad_seen.add(path)
            self.bad_files.append((path, reason))
