"""Image validation and normalisation for image shards: decompression bombs are refused before decoding,
corrupt files are named, and every kept image becomes a square RGB PNG at the configured size."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from wudao.data.quarantine import Reason


class ImageRejected(Exception):
    """Not an error: the signal that an image is refused, with the quarantine reason the caller records."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


def normalize_image(data: bytes, size: int, max_pixels: int) -> bytes:
    """Center-crop to a square, resize to `size`, and return PNG bytes (lossless: FID is sensitive to JPEG)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} pixels exceeds {max_pixels}")
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, str(e)[:200]) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageRejected(Reason.CORRUPT_IMAGE, str(e)[:200]) from e
    img = img.convert("RGB")
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def png_bytes(image_HWC: np.ndarray) -> bytes:
    """A uint8 RGB image as PNG bytes (lossless, as the shards keep images)."""
    out = io.BytesIO()
    Image.fromarray(image_HWC).save(out, format="PNG")
    return out.getvalue()
