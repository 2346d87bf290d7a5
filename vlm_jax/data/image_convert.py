"""Decoding user images of any size and mode into square uint8 RGB arrays.

Modes: 8-bit RGB as is; grayscale, CMYK, YCbCr, LAB, HSV and bilevel converted by Pillow;
16-bit grayscale ('I;16', 'I') scaled by 255 / 65535 (Pillow's own conversion would clip
everything above 255 to white); float ('F') read as [0, 1] when its values lie there, else
clipped to [0, 255]; anything with transparency (RGBA, LA, palettes with a transparent colour)
composited onto white, so transparent pixels do not become whatever colour they happen to
store. EXIF orientation is applied first, as photo viewers do.

Resizing: 'crop' scales the shorter side to `size` (bicubic) and keeps the centre square, as
CLIP's preprocessing does; 'squash' scales both sides to `size`, keeping the whole picture
but not its aspect ratio.
"""
import io

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ('crop', 'squash')
_SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow image -> an 8-bit 'RGB' image (see the module docstring)."""
  img = ImageOps.exif_transpose(img)
  if img.mode in _SIXTEEN_BIT or img.mode == 'F':
    values = np.asarray(img, np.float64)
    if img.mode != 'F':
      values = values * (255.0 / 65535.0)
    elif values.size and values.min() >= 0.0 and values.max() <= 1.0:
      values = values * 255.0
    img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')
  if img.mode == 'P' and 'transparency' in img.info:
    img = img.convert('RGBA')
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _WHITE + (255,))
    img = Image.alpha_composite(background, rgba)
  return img if img.mode == 'RGB' else img.convert('RGB')


def resize(img: Image.Image, size: int, mode: str = 'crop') -> np.ndarray:
  """RGB image -> uint8 [size, size, 3] by `mode` ('crop' | 'squash')."""
  if mode == 'squash':
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
  if mode != 'crop':
    raise ValueError(f'Unknown resize mode {mode!r} (data.resize); accepted: {RESIZE_MODES}.')
  width, height = img.size
  scale = size / min(width, height)
  new = (max(size, round(width * scale)), max(size, round(height * scale)))
  img = img.resize(new, Image.Resampling.BICUBIC)
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def decode(data: bytes, size: int, mode: str = 'crop') -> tuple[np.ndarray, str]:
  """Encoded image bytes (any format Pillow reads) -> (uint8 [size, size, 3], source mode).

  Raises whatever Pillow raises for data it cannot decode completely (a truncated JPEG
  raises OSError at `load`, a text file UnidentifiedImageError).
  """
  with Image.open(io.BytesIO(data)) as img:
    img.draft(None, (size, size))  # JPEG: decode at the smallest scale still >= size
    img.load()
    return resize(to_rgb(img), size, mode), img.mode
