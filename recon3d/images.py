"""Load, validate and prepare input images for a reconstruction model.

Every refusal raises :class:`ImageError` with a message fit for a user: not an image, truncated or corrupt,
too many pixels (decompression bombs are refused from the header, before decoding), too small, fully transparent.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .options import Limit

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 40_000_000  # 40 MP: more than any phone photo, far less than a decompression bomb
MIN_SIDE = 32
FOREGROUND_RATIO = Limit("foreground ratio", 0.5, 1.0)  # the object's longer side as a fraction of the square input
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


@dataclass
class PreparedImage:
    image: Image.Image  # RGB, size x size, object composited on white
    foreground_mask: Image.Image  # L, same size
    had_alpha: bool
    background_removed: bool
    notes: list[str]
    background_seconds: float = 0.0  # time spent in background removal (part of preparing the image)


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGBA, honouring EXIF orientation."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        name = "image" if isinstance(source, bytes) else Path(source).name
        image = _open(io.BytesIO(source) if isinstance(source, bytes) else source, name, max_pixels)
    _check_size(image.size, max_pixels)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: PIL's convert would clip
        image = Image.fromarray(_to_uint8(np.asarray(image), high_bit_depth=image.mode != "F"))
    return image.convert("RGBA") if image.mode != "RGBA" else image


def _open(fp, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            if image.format not in SUPPORTED_FORMATS:
                raise ImageError(f"{name}: {image.format} images are not supported; use PNG, JPEG or WebP")
            _check_size(image.size, max_pixels)  # from the header, before decoding any pixel
            image.load()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (PNG, JPEG or WebP expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels (limit {max_pixels / 1e6:.0f} MP)") from None
    except (OSError, SyntaxError) as exc:  # the OS's own text names paths: keep only its reason
        reason = exc.strerror if isinstance(exc, OSError) and exc.filename else exc
        raise ImageError(f"{name}: the file is truncated or corrupt ({reason})") from None
    return image


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height / 1e6:.1f} MP; "
                         f"the limit is {max_pixels / 1e6:.0f} MP")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height}; it must be at least {MIN_SIDE} px on each side")


def _to_uint8(array: np.ndarray, high_bit_depth: bool = False) -> np.ndarray:
    """uint8 as is; bool; uint16 (or 16-bit values in wider ints) scaled from 0..65535; floats must be in [0, 1]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and (array.dtype == np.uint16 or high_bit_depth):
        return (np.clip(array, 0, 65535).astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError("float image arrays must hold finite values in [0, 1]")
        return (array * 255 + 0.5).astype(np.uint8)
    raise ImageError(f"image arrays must be uint8, uint16, bool or float in [0, 1], not {array.dtype}")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ImageError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    image = Image.fromarray(_to_uint8(array))
    _check_size(image.size, MAX_PIXELS)
    return image.convert("RGBA")


def has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255


class BackgroundRemover:
    """rembg (u2net) when installed and its weights are reachable; otherwise says why and does nothing."""

    def __init__(self, model_name: str = "u2net", offline: bool = False):
        self.model_name, self.offline = model_name, offline
        self._session, self.unavailable_reason = None, None

    def _load(self) -> None:
        try:
            from rembg import new_session  # heavy (onnxruntime): imported on first use
            from rembg.sessions import sessions_class
        except ImportError as exc:
            self.unavailable_reason = f"background removal needs the rembg package ({exc})"
            return
        session_class = next((c for c in sessions_class if c.name() == self.model_name), None)
        weights = Path(session_class.u2net_home()) / f"{self.model_name}.onnx" if session_class else None
        if self.offline and (weights is None or not weights.exists()):
            self.unavailable_reason = (f"background removal model {self.model_name} is not downloaded and the "
                                       f"network is off; continuing without it (expected at {weights})")
            return
        try:
            self._session = new_session(self.model_name)
        except Exception as exc:  # network errors, broken downloads: keep serving
            self.unavailable_reason = f"background removal model {self.model_name} could not be loaded ({exc})"

    def __call__(self, image: Image.Image) -> Image.Image | None:
        """RGBA with the background made transparent, or None (see ``unavailable_reason``)."""
        if self._session is None and self.unavailable_reason is None:
            self._load()
        if self._session is None:
            return None
        from rembg import remove

        try:
            return remove(image.convert("RGB"), session=self._session).convert("RGBA")
        except Exception as exc:  # a failing model must not stop the job: continue without it
            self.unavailable_reason = f"background removal failed ({type(exc).__name__}: {exc}); continuing without it"
            self._session = None
            return None


def has_foreground(image: Image.Image, threshold: int = 128) -> bool:
    return image.getchannel("A").getextrema()[1] >= threshold


def foreground_bbox(alpha: np.ndarray, threshold: int = 128) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) exclusive bounds of alpha >= threshold."""
    rows, cols = np.nonzero(alpha >= threshold)
    if rows.size == 0:
        raise ImageError("the image is fully transparent: there is no object to reconstruct")
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def check_foreground_ratio(foreground_ratio: float) -> float:
    return FOREGROUND_RATIO.check(foreground_ratio)


def recentre(image: Image.Image, foreground_ratio: float, size: int) -> Image.Image:
    """Crop RGBA to its foreground, scale it so its longer side is ``foreground_ratio * size`` and centre it on
    a transparent ``size`` x ``size`` square. Scaling before padding keeps memory bounded for any aspect ratio."""
    check_foreground_ratio(foreground_ratio)
    top, left, bottom, right = foreground_bbox(np.asarray(image.getchannel("A")))
    crop = image.crop((left, top, right, bottom))
    scale = foreground_ratio * size / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                       Image.Resampling.BICUBIC)
    square = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    square.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return square


def composite_on_white(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB")


def prepare_image(source: ImageInput, size: int, foreground_ratio: float = 0.8,
                  remove_background: BackgroundRemover | None = None) -> PreparedImage:
    """Image -> the model's input: foreground found (alpha, or background removal), recentred, on white, resized."""
    image = load_image(source)
    notes: list[str] = []
    had_alpha = has_transparency(image)
    removed, background_seconds = False, 0.0
    if not had_alpha and remove_background is not None:
        start = time.perf_counter()
        cut = remove_background(image)
        background_seconds = time.perf_counter() - start
        if cut is None:
            notes.append(remove_background.unavailable_reason)
        else:
            image, removed = cut, True
    if removed and not has_foreground(image):
        raise ImageError("background removal found no object in the image; turn it off to use the whole image")
    if had_alpha or removed:
        image = recentre(image, foreground_ratio, size)
    else:
        notes.append("no transparency and no background removal: the whole image is treated as the object")
        image = recentre(image.convert("RGBA"), 1.0, size)  # letterboxed to a square
    mask = image.getchannel("A")
    rgb = composite_on_white(image)
    for note in notes:
        log.warning(note)
    return PreparedImage(rgb, mask, had_alpha, removed, notes, background_seconds)


def image_to_tensor(image: Image.Image):
    """PIL RGB -> float tensor (1, 3, H, W) in [0, 1] (no normalisation: LRM's encoder expects raw [0, 1])."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def views_grid(views, size: int | None = None) -> Image.Image:
    """Views (B, V, 3, H, W) in [0, 1] (a torch tensor) as one image: one row per object, one column per view,
    each view scaled to ``size`` pixels (nearest: the model's own pixels, not smoothed; None: as they are)."""
    import torch.nn.functional as F

    b, v, _, h, w = views.shape
    tiles = views.float().flatten(0, 1).clamp(0, 1)  # (B*V, 3, H, W)
    if size is not None:
        tiles, h, w = F.interpolate(tiles, size=(size, size), mode="nearest"), size, size
    grid = tiles.reshape(b, v, 3, h, w).permute(0, 3, 1, 4, 2).reshape(b * h, v * w, 3)
    return Image.fromarray((grid.cpu().numpy() * 255 + 0.5).astype("uint8"))


LABEL_ROW = 24  # pixels below a labelled grid for its column labels


def labelled_grid(grid: Image.Image, rows: list[str], columns: list[str]) -> Image.Image:
    """A grid of equal cells (one row per entry of ``rows``, one column per entry of ``columns``) with each row's
    label in a left margin as wide as the longest and each column's in a row below (an image widget's own label
    covers the top-left corner), dark on white."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    left = 12 + int(max(ImageDraw.Draw(grid).textlength(text, font=font) for text in rows))
    cell_w, cell_h = grid.width // len(columns), grid.height // len(rows)
    out = Image.new("RGB", (grid.width + left, grid.height + LABEL_ROW), (255, 255, 255))
    out.paste(grid, (left, 0))
    draw = ImageDraw.Draw(out)
    for index, text in enumerate(rows):
        draw.text((6, index * cell_h + cell_h // 2), text, fill=(40, 40, 40), font=font, anchor="lm")
    for index, text in enumerate(columns):
        draw.text((left + index * cell_w + cell_w // 2, grid.height + LABEL_ROW // 2), text, fill=(40, 40, 40),
                  font=font, anchor="mm")
    return out
