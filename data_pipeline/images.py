"""Images in: bytes, files and data URLs -> checked RGB arrays -> the pixels a vision tower reads.

Every way an image enters (a training row's file, a chat request's data URL) goes through
``decode_image``, so a corrupt, oversized or remote image fails the same way everywhere: a
``UserError`` naming the image and the limit, never a traceback.
"""
from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # an encoded image larger than this is refused before decoding
MAX_IMAGE_PIXELS = 4096 * 4096  # width * height; Pillow reads the size from the header, before the pixels


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, GIF, WebP, BMP...) -> (H, W, 3) uint8 RGB, upright (EXIF
    orientation applied), transparency composited on white, the first frame of an animation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(f"{where} is {len(data) / 1e6:.1f} MB; images up to {MAX_IMAGE_BYTES / 1e6:.0f} MB are accepted.")
    try:
        with warnings.catch_warnings():  # Pillow warns about damaged metadata it skips; the log is no place for it
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(f"{where} is {w}x{h} pixels; images up to {MAX_IMAGE_PIXELS} pixels are accepted.")
            try:
                img = ImageOps.exif_transpose(img)  # a phone photo's orientation tag, applied as a viewer does
            except Exception:  # noqa: BLE001  a damaged EXIF block: the pixels as stored
                pass
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # transparent -> on white, not black
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
        raise UserError(f"{where} could not be decoded as an image ({type(err).__name__}: {err}); "
                        "send a PNG, JPEG, GIF, WebP or BMP file.") from None


def load_image_file(path: str | Path, where: str = "") -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{where}image file {str(p)!r} does not exist.")
    return decode_image(p.read_bytes(), f"{where}image file {str(p)!r}")


def decode_image_url(url: str, where: str = "image_url") -> np.ndarray:
    """An OpenAI ``image_url``: a ``data:image/...;base64,...`` URL. Remote URLs are refused (the
    server fetches nothing: it may run offline, and fetching on a client's behalf is a risk)."""
    if not isinstance(url, str) or not url:
        raise UserError(f"{where} must be a data URL string (data:image/png;base64,...).")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise UserError(f"{where} is a {scheme!r} URL; this server does not fetch remote images. Send the image "
                        "inline as a data URL (data:image/png;base64,...).")
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise UserError(f"{where} must be a base64 image data URL (data:image/<type>;base64,...), got {head[:40]!r}.")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"{where} holds more than {MAX_IMAGE_BYTES / 1e6:.0f} MB; send a smaller image.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where} is not valid base64.") from None
    return decode_image(data, where)


def encode_png_data_url(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> a PNG data URL (what a client sends)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images -> (n, 3, size, size) float32 in [-1, 1] (SigLIP's normalisation, mean = std = 0.5),
    resized (bilinear) when they are not size x size."""
    from PIL import Image

    out = []
    for img in images:
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        out.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))  # a writable copy
    if not out:
        return torch.zeros(0, 3, size, size)
    return torch.stack(out).float() / 127.5 - 1.0
