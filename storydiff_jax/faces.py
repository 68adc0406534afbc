"""ArcFace face embeddings for PhotoMaker v2, from insightface's `buffalo_l` models run by onnxruntime on the host.

PhotoMaker v2 conditions on a 512-d ArcFace embedding per reference photo, computed by insightface's
`FaceAnalysis(name="buffalo_l")`: `faces[0]["embedding"]` (raw, not normalised). This module restates the two
models of that pack it needs, with numpy and onnxruntime only (no insightface, no OpenCV):

1. **Detection**, SCRFD (`det_10g.onnx`): the RGB photo is resized (aspect kept, bilinear like cv2.resize)
   into the top-left of a square canvas, normalised `(x - 127.5) / 128`; the 9 outputs are scores, box
   distances and 5 keypoints for strides 8, 16, 32 with 2 anchors per cell; boxes and points are decoded
   from the anchor centres, kept where score >= 0.5, sorted by score, NMS at IoU 0.4. As PhotoMaker's own
   `analyze_faces`, the canvas sizes 640, 576, ..., 256 are tried until a face is found; the best-scoring
   face is used.
2. **Alignment**: the similarity transform (Umeyama, as skimage's SimilarityTransform) from the 5 keypoints
   to ArcFace's 112 x 112 template, applied with bilinear sampling and black borders (cv2.warpAffine).
3. **Recognition**, ArcFace R50 (`w600k_r50.onnx`): the aligned crop normalised `(x - 127.5) / 127.5`, RGB,
   NCHW -> the 512-d embedding.

Resampling is plain bilinear in float64, not OpenCV's fixed-point arithmetic: expect embeddings close to
insightface's, not bit-identical. onnxruntime is the optional `arcface` extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import ConfigError
from .images import load_image

DETECTOR = "det_10g.onnx"
RECOGNIZER = "w600k_r50.onnx"
DETECTION_SIZES = tuple(range(640, 255, -64))    # 640, 576, ..., 256: PhotoMaker's analyze_faces
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
EMBEDDING_DIM = 512
ALIGNED_SIZE = 112
# ArcFace's landmark template for a 112 x 112 crop: eyes, nose tip, mouth corners (x, y).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float64)


# ----------------------------------------------------------------------------------------------------
# Geometry


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C] float64, bilinear with half-pixel centres and edge clamping
    (cv2.resize's INTER_LINEAR, without antialiasing)."""
    h, w = image.shape[:2]

    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix of the least-squares similarity (rotation, uniform scale, translation) taking the
    points `src` [N, 2] onto `dst` [N, 2] (Umeyama 1991, as skimage's SimilarityTransform.estimate)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Output pixel (x, y) = image sampled bilinearly at matrix^-1 (x, y); black outside (cv2.warpAffine)."""
    full = np.vstack([matrix, [0, 0, 1]])
    inverse = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    h, w = image.shape[:2]
    img = image.astype(np.float64)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    out = np.zeros((size, size, image.shape[2]))
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(sx - xi)) * (1 - np.abs(sy - yi))
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out += np.where(inside, weight, 0)[..., None] * img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first (insightface's +1 pixel areas)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = rest[overlap <= threshold]
    return keep


# ----------------------------------------------------------------------------------------------------
# The models


class FaceEmbedder:
    """insightface's buffalo_l detection + recognition models from a folder, on onnxruntime's CPU provider."""

    def __init__(self, folder: str | os.PathLike):
        folder = os.fspath(folder)
        missing = [f for f in (DETECTOR, RECOGNIZER) if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConfigError(f"--face-model {folder} lacks {' and '.join(missing)}; point it at insightface's "
                              "buffalo_l models (the unzipped buffalo_l.zip), or pass --face-embeds FILE.npy")
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("--face-model needs onnxruntime: pip install 'storydiff-jax[arcface]' (or pass "
                              "--face-embeds FILE.npy computed elsewhere)") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.detector = onnxruntime.InferenceSession(os.path.join(folder, DETECTOR), options,
                                                         providers=["CPUExecutionProvider"])
            self.recognizer = onnxruntime.InferenceSession(os.path.join(folder, RECOGNIZER), options,
                                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad model files
            raise ConfigError(f"--face-model {folder}: the ONNX models cannot be loaded "
                              f"({str(e).splitlines()[0][:150]}); download buffalo_l again") from None
        if len(self.detector.get_outputs()) != 3 * len(STRIDES):
            raise ConfigError(f"--face-model {folder}: {DETECTOR} has {len(self.detector.get_outputs())} outputs, "
                              "not SCRFD's 9 (scores, boxes, keypoints per stride); use buffalo_l's det_10g.onnx")

    def detect(self, rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [n, 4], scores [n], keypoints [n, 5, 2]) in photo pixels, best first, on a size x size canvas."""
        h, w = rgb.shape[:2]
        if h / w > 1:
            new_h, new_w = size, int(size / (h / w))
        else:
            new_w, new_h = size, int(size * (h / w))
        scale = new_h / h
        canvas = np.zeros((size, size, 3))
        canvas[:new_h, :new_w] = resize_bilinear(rgb, new_w, new_h)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None].astype(np.float32)
        outs = self.detector.run(None, {self.detector.get_inputs()[0].name: blob})
        boxes, scores, points = [], [], []
        for i, stride in enumerate(STRIDES):
            score = np.asarray(outs[i]).reshape(-1)
            dist = np.asarray(outs[i + len(STRIDES)]).reshape(-1, 4) * stride
            kps = np.asarray(outs[i + 2 * len(STRIDES)]).reshape(-1, 10) * stride
            gh, gw = size // stride, size // stride
            centres = np.stack(np.mgrid[:gh, :gw][::-1], axis=-1).reshape(-1, 2).astype(np.float64) * stride
            centres = np.repeat(centres, ANCHORS_PER_CELL, axis=0)   # anchors of a cell are consecutive
            keep = score >= SCORE_THRESHOLD
            c = centres[keep]
            boxes.append(np.concatenate([c - dist[keep][:, :2], c + dist[keep][:, 2:]], axis=1))
            scores.append(score[keep])
            points.append(c[:, None] + kps[keep].reshape(-1, 5, 2))
        boxes, scores, points = np.concatenate(boxes) / scale, np.concatenate(scores), np.concatenate(points) / scale
        kept = nms(boxes, scores)
        return boxes[kept], scores[kept], points[kept]

    def embed(self, image) -> np.ndarray | None:
        """The 512-d embedding of the best-scoring face of an RGB photo (PIL or uint8 [H, W, 3]), or None."""
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        for size in DETECTION_SIZES:
            _, _, points = self.detect(rgb, size)
            if len(points):
                break
        else:
            return None
        crop = warp_affine(rgb, similarity_transform(points[0], ARCFACE_TEMPLATE), ALIGNED_SIZE)
        blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None].astype(np.float32)
        out = self.recognizer.run(None, {self.recognizer.get_inputs()[0].name: blob})[0]
        return np.asarray(out, np.float32).reshape(-1)

    def embed_photos(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """[photos, 512]; a photo without a face gets a row of NaNs (`identity.photos_with_faces` drops it)."""
        rows = []
        for path in paths:
            emb = self.embed(load_image(path))
            rows.append(np.full((EMBEDDING_DIM,), np.nan, np.float32) if emb is None else emb)
        return np.stack(rows)
