"""Control images for ControlNets, and the preprocessors that need no weights (numpy, PIL, scipy only).

A control image enters a ControlNet as float32 [H, W, 3] in [0, 1] at the output's pixel size, as
diffusers' ControlNet pipelines prepare it (`VaeImageProcessor(do_normalize=False)`: RGB, stretched to
H x W with PIL's Lanczos filter, divided by 255). `control_image` does that for any map the user
brings (depth, lineart, scribble, segmentation ... taken as given) and runs the two built-in
preprocessors at the output size:

- `canny`: OpenCV's `cv2.Canny(image, low, high)` as controlnet_aux calls it (aperture 3, L1 gradient,
  RGB input), edges stacked to 3 channels. Restated step by step below; tests/test_control_images.py
  compares it with OpenCV pixel for pixel.
- `pose`: skeletons drawn from OpenPose keypoint JSON (COCO-18; BODY_25 and MS-COCO-17 are mapped to
  it) in the OpenPose ControlNet's drawing convention: 17 limbs as filled ellipses 4 px wide at 60% of
  their colour, then 18 joints as 4 px discs in full colour, on black.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from .errors import ConfigError
from .images import load_image

PREPROCESSORS = ("none", "canny", "pose")

# --------------------------------------------------------------------------------------------------
# Canny
# --------------------------------------------------------------------------------------------------

# tan(22.5 deg) in OpenCV's 15-bit fixed point: the gradient-direction sector test uses integers only.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (int32) of [H, W, C] with replicated borders, as OpenCV's Canny takes them."""
    p = np.pad(img.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    left, centre, right = p[:, :-2], p[:, 1:-1], p[:, 2:]
    dx = (right - left)[:-2] + 2 * (right - left)[1:-1] + (right - left)[2:]
    smooth = left + 2 * centre + right
    dy = smooth[2:] - smooth[:-2]
    return dx, dy


def canny(image, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny edges of an RGB (or grey) uint8 image: [H, W, 3] uint8, 255 on edges, 0 elsewhere.

    1. Sobel dx, dy per channel; magnitude |dx| + |dy|; per pixel the channel with the largest magnitude
       (the first on ties) gives the gradient.
    2. Non-maximum suppression: the gradient direction falls in one of four sectors (integer test against
       tan 22.5 and tan 67.5); a pixel survives if its magnitude is > `low` and a maximum along that
       direction: strictly above the neighbour before it and >= the one after it (both strictly on
       diagonals). Outside the image counts as magnitude 0.
    3. Hysteresis: surviving pixels 8-connected (through survivors) to one with magnitude > `high`.
    Thresholds are floored to integers and swapped if low > high, as OpenCV does.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ConfigError(f"canny: needs a uint8 [H, W] or [H, W, C] image, got {img.dtype} {img.shape}")
    low, high = sorted((float(low), float(high)))
    low, high = math.floor(low), math.floor(high)

    dx, dy = _sobel(img)
    norms = np.abs(dx) + np.abs(dy)
    best = norms.argmax(axis=-1)[..., None]
    dx, dy, mag = (np.take_along_axis(a, best, axis=-1)[..., 0] for a in (dx, dy, norms))

    m = np.pad(mag, 1)                                      # zero magnitude around the image
    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x                                 # gradient within 22.5 deg of the x axis
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0                              # gradient along the main diagonal
    row, up, down = m[1:-1], m[:-2], m[2:]
    maximum = np.where(horizontal, (mag > row[:, :-2]) & (mag >= row[:, 2:]), False)
    maximum |= vertical & (mag > up[:, 1:-1]) & (mag >= down[:, 1:-1])
    main = (mag > up[:, :-2]) & (mag > down[:, 2:])         # up-left and down-right neighbours
    anti = (mag > up[:, 2:]) & (mag > down[:, :-2])         # up-right and down-left neighbours
    maximum |= diagonal & np.where(same_sign, main, anti)
    candidate = maximum & (mag > low)

    from scipy import ndimage

    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    strong = np.unique(labels[candidate & (mag > high)])
    edges = np.isin(labels, strong[strong > 0])
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------------------
# Pose skeletons
# --------------------------------------------------------------------------------------------------

# COCO-18 (OpenPose) joints: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist,
# 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left ear.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH = 4            # half-width of a limb's ellipse, px
JOINT_RADIUS = 4
LIMB_BRIGHTNESS = 0.6
# Other keypoint layouts -> COCO-18 (by joint index; the neck of MS-COCO-17 is the shoulders' midpoint).
_FROM_BODY25 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
_FROM_COCO17 = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


def _to_coco18(points: np.ndarray, where: str) -> np.ndarray:
    """[n, 3] (x, y, confidence) keypoints of a known layout -> [18, 3]; missing joints get confidence 0."""
    n = len(points)
    if n == 18:
        return points
    if n == 25:
        return points[list(_FROM_BODY25)]
    if n == 17:
        out = np.zeros((18, 3))
        for k, j in enumerate(_FROM_COCO17):
            if j is not None:
                out[k] = points[j]
        if points[5, 2] > 0 and points[6, 2] > 0:
            out[1] = (points[5] + points[6]) / 2
        return out
    raise ConfigError(f"{where}: a person has {n} keypoints; expected 18 (COCO-18 / OpenPose), 25 (BODY_25) or 17 "
                      "(MS COCO), each as x, y, confidence")


def read_pose(source, where: str = "pose") -> tuple[list[np.ndarray], tuple[int, int] | None]:
    """OpenPose keypoint JSON (a path or the parsed dict) -> (people as [18, 3] arrays of x, y, confidence
    in the JSON's coordinates, (canvas_width, canvas_height) if the JSON gives them)."""
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            with open(source, encoding="utf-8") as f:
                source = json.load(f)
        except OSError as e:
            raise ConfigError(f"pose file {where} cannot be read ({e.strerror}); check the path") from None
        except ValueError as e:
            raise ConfigError(f"pose file {where} is not valid JSON ({e}); write OpenPose keypoint JSON") from None
    if not isinstance(source, dict) or not isinstance(source.get("people"), list):
        raise ConfigError(f"{where}: expected OpenPose keypoint JSON: {{\"people\": [{{\"pose_keypoints_2d\": "
                          "[x, y, confidence, ...]}}], \"canvas_width\": W, \"canvas_height\": H}")
    people = []
    for person in source["people"]:
        values = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        try:
            points = np.asarray(values, np.float64).reshape(-1, 3)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: pose_keypoints_2d must be a flat list of numbers x, y, confidence "
                              "per joint") from None
        if not np.isfinite(points).all():
            raise ConfigError(f"{where}: pose_keypoints_2d holds non-finite numbers")
        people.append(_to_coco18(points, where))
    canvas = None
    if "canvas_width" in source and "canvas_height" in source:
        canvas = (int(source["canvas_width"]), int(source["canvas_height"]))
        if min(canvas) < 1:
            raise ConfigError(f"{where}: canvas_width/canvas_height must be positive, got {canvas}")
    return people, canvas


def draw_pose(people: list[np.ndarray], height: int, width: int, canvas: tuple[int, int] | None = None) -> np.ndarray:
    """Skeletons on black, [height, width, 3] uint8. Keypoints are in `canvas` (width, height) pixels when
    given, in [0, 1] when every coordinate is, else in output pixels; joints with confidence <= 0 are
    missing (and so are their limbs). Parts outside the image are clipped."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    scaled = []
    for points in people:
        xy = points[:, :2].astype(np.float64)
        valid = points[:, 2] > 0
        if canvas is not None:
            xy = xy * (width / canvas[0], height / canvas[1])
        elif valid.any() and np.abs(xy[valid]).max() <= 1.0:
            xy = xy * (width, height)
        scaled.append((xy, valid))
    # All limbs first, then all joints on top, limb k and joint k in colour k (the reference's order).
    for xy, valid in scaled:
        for k, (a, b) in enumerate(LIMBS):
            if valid[a] and valid[b]:
                colour = tuple(int(c * LIMB_BRIGHTNESS) for c in COLOURS[k])
                draw.polygon(_limb_polygon(xy[a], xy[b]), fill=colour)
    for xy, valid in scaled:
        for k in range(18):
            if valid[k]:
                x, y = int(xy[k, 0]), int(xy[k, 1])
                draw.ellipse((x - JOINT_RADIUS, y - JOINT_RADIUS, x + JOINT_RADIUS, y + JOINT_RADIUS), fill=COLOURS[k])
    return np.asarray(image)


def _limb_polygon(p: np.ndarray, q: np.ndarray) -> list[tuple[int, int]]:
    """The ellipse between two joints as OpenCV's `ellipse2Poly` samples it (1-degree steps, integer centre,
    half-axes and angle), which the reference fills."""
    cx, cy = int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2)
    half_length = int(math.hypot(*(p - q)) / 2)
    angle = math.radians(int(math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))))
    t = np.radians(np.arange(0, 361))
    x, y = half_length * np.cos(t), STICK_WIDTH * np.sin(t)
    px = np.round(cx + x * math.cos(angle) - y * math.sin(angle)).astype(int)
    py = np.round(cy + x * math.sin(angle) + y * math.cos(angle)).astype(int)
    return list(zip(px.tolist(), py.tolist()))


# --------------------------------------------------------------------------------------------------
# From a user's file to the ControlNet's input
# --------------------------------------------------------------------------------------------------

def control_image(source, height: int, width: int, *, preprocessor: str = "none", low: float = 100,
                  high: float = 200) -> np.ndarray:
    """A ControlNet input, float32 [height, width, 3] in [0, 1]: `control_map(...) / 255`."""
    return control_map(source, height, width, preprocessor=preprocessor, low=low, high=high).astype(np.float32) / 255.0


def control_map(source, height: int, width: int, *, preprocessor: str = "none", low: float = 100,
                high: float = 200) -> np.ndarray:
    """A ControlNet's control map, uint8 [height, width, 3] (what `control_image` divides by 255).

    source: an image (path, PIL image or uint8 array) or, for `preprocessor="pose"`, OpenPose keypoint
    JSON (a `.json` path or the parsed dict). A `.json` path implies "pose".
    preprocessor: "none" (the image is the control map: depth, lineart, scribble, an edge or pose map...),
    "canny" (edges of the image, thresholds `low`/`high`) or "pose". The image is first stretched to
    height x width (Lanczos), so edges are found at the output's resolution.
    """
    if preprocessor not in PREPROCESSORS:
        raise ConfigError(f"unknown control preprocessor {preprocessor!r}; use one of {', '.join(PREPROCESSORS)}")
    if is_pose_source(source) or preprocessor == "pose":
        if not is_pose_source(source):
            raise ConfigError("the pose preprocessor draws OpenPose keypoint JSON; pass a .json file (an image is "
                              "taken as a ready pose map with preprocessor 'none')")
        people, canvas = read_pose(source)
        return draw_pose(people, height, width, canvas)
    image = _as_rgb(source).resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    if preprocessor == "canny":
        pixels = canny(pixels, low, high)
    return pixels


def is_pose_source(source) -> bool:
    """OpenPose keypoints (a parsed dict or a `.json` path) rather than an image."""
    return isinstance(source, dict) or (isinstance(source, (str, os.PathLike))
                                        and os.fspath(source).lower().endswith(".json"))


def _as_rgb(source) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        return load_image(source)
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    arr = np.asarray(source)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ConfigError(f"control image: array of {arr.dtype} {arr.shape}; pass uint8 [H, W] or [H, W, 3] pixels")
    return Image.fromarray(arr).convert("RGB")
