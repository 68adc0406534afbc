"""Image loading and CLIP preprocessing (PIL + numpy only: no torch, no torchvision).

`clip_preprocess` reproduces transformers' `CLIPImageProcessor` as IP-Adapter calls it (default
settings: shortest edge 224, bicubic, center crop 224, OpenAI CLIP mean/std) step by step:
1. resize so the short side is `size`, the long side `int(size * long / short)` (truncated, as both
   transformers and torchvision compute it), with PIL's antialiased bicubic filter on uint8 RGB;
2. center crop with the top-left corner at `(resized - size) // 2`;
3. float32(uint8 * (1/255), computed in float64), then (x - mean) / std in float32.
tests/test_clip_vision.py measures the difference to transformers on non-square images: 0.0 against its
PIL backend (the one it runs without torchvision). Its default torchvision backend resizes tensors with
torch's antialiased bicubic, which is close to but not bit-identical with PIL's.

open_clip's own transform (torchvision `Resize` + `CenterCrop`) resizes the same way (PIL on PIL
input) but places the crop at `round((resized - size) / 2)`: when the margin is odd and its half
rounds up (Python's round-half-to-even: a margin of 515 gives 258 where we take 257) the crop sits
one pixel later. We follow transformers because IP-Adapter's reference code preprocesses with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet statistics, which DINOv2's image processor normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as a PIL RGB image (alpha dropped, palette/greyscale expanded)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"image {path} not found; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"image {path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "use a PNG/JPEG/WebP file") from None


def _as_pil(image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ConfigError(f"image {index}: array of dtype {arr.dtype}; pass uint8 RGB pixels (0..255), "
                          "not normalised floats")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise ConfigError(f"image {index}: array of shape {arr.shape}; pass [height, width, 3] uint8 RGB (HWC)")
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


# PIL's filters by the names used here; transformers' configs store their PIL numbers (2 bilinear, 3 bicubic).
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def resize_short_side(image: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Antialiased resize (bicubic unless told) so that the shorter side is `size` pixels."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # truncation, like transformers / torchvision
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), resample=RESAMPLE[resample])


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C], corner at floor((H - size) / 2), floor((W - size) / 2)."""
    h, w = arr.shape[:2]
    if h < size or w < size:  # cannot happen after resize_short_side; kept as a guard for direct callers
        raise ConfigError(f"image of {w}x{h} pixels is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def clip_preprocess(images: Sequence | np.ndarray | Image.Image, size: int = 224) -> np.ndarray:
    """Images -> np.float32 [B, size, size, 3], CLIP-normalised, ready for `CLIPVisionModel`.

    images: a PIL image, a list of PIL images / uint8 [H, W, 3] arrays, or one uint8 [B, H, W, 3] array.
    """
    return resize_crop_normalize(images, size, size, CLIP_MEAN, CLIP_STD, what="clip_preprocess")


def resize_crop_normalize(images: Sequence | np.ndarray | Image.Image, resize: int, crop: int,
                          mean: Sequence[float], std: Sequence[float], *, resample: str = "bicubic",
                          keep_aspect: bool = True, what: str = "preprocess") -> np.ndarray:
    """transformers' image processors' PIL path: shortest side to `resize` (`CLIPImageProcessor`, DINOv2's
    `BitImageProcessor`), or, with keep_aspect=False, both sides to `resize` (`ViTImageProcessor`'s
    {"height", "width"} size: the aspect ratio is not kept); then centre crop `crop` (a no-op when it equals
    the squashed size), [0, 1], then (x - mean) / std. Returns np.float32 [B, crop, crop, 3]."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    if resize < 1 or crop < 1:
        raise ConfigError(f"{what}: sizes must be positive, got resize {resize}, crop {crop}")
    if crop > resize:
        raise ConfigError(f"{what}: the {crop} px crop is larger than the {resize} px resize; use crop <= resize")
    if resample not in RESAMPLE:
        raise ConfigError(f"{what}: unknown resampling filter {resample!r}; use one of {', '.join(RESAMPLE)}")
    if len(images) == 0:
        raise ConfigError(f"{what}: no images given")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = np.empty((len(images), crop, crop, 3), np.float32)
    for i, image in enumerate(images):
        image = _as_pil(image, i)
        if keep_aspect:
            image = resize_short_side(image, resize, resample)
        else:
            image = image.resize((resize, resize), resample=RESAMPLE[resample])
        pixels = center_crop(np.asarray(image), crop)
        # float64 product then float32, and the normalisation in float32: transformers' arithmetic, so
        # the only possible differences to it are in the resampling.
        out[i] = ((pixels.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
    return out


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a network wants its images (`resize_crop_normalize` with these settings), e.g. CLIP's
    (224, 224, CLIP_MEAN, CLIP_STD), DINOv2's (256, 224, IMAGENET_MEAN, IMAGENET_STD) or DINO v1's folder
    (224, 224, (0.5,) * 3, (0.5,) * 3, "bilinear", keep_aspect=False)."""
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = "bicubic"
    keep_aspect: bool = True

    def __call__(self, images) -> np.ndarray:
        return resize_crop_normalize(images, self.resize, self.crop, self.mean, self.std, resample=self.resample,
                                     keep_aspect=self.keep_aspect)
