"""Control images: our Canny vs OpenCV's pixel for pixel; pose skeletons vs an OpenCV re-statement of the
OpenPose ControlNet's drawing (controlnet_aux's `draw_bodypose`), deterministic and inside the image;
`control_image` sizes, ranges and one-line errors. OpenCV is optional (the comparisons skip without it)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from storydiff_jax.control_images import COLOURS, LIMBS, canny, control_image, draw_pose, read_pose
from storydiff_jax.errors import ConfigError


def _scene(h=96, w=128, seed=0) -> np.ndarray:
    """Shapes, a soft gradient and noise: edges in every direction, weak and strong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 60 + 100 * (xx / w)
    img[..., 1] = np.where((xx - 70) ** 2 + (yy - 40) ** 2 < 25 ** 2, 200, 40)
    img[..., 2] = np.where((yy > xx * 0.6 + 10) & (yy < 80), 180, 30)
    img[20:50, 10:40] = (250, 250, 250)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("thresholds", [(100, 200), (40, 90), (150.7, 60.2)])
def test_canny_matches_opencv(thresholds):
    cv2 = pytest.importorskip("cv2")
    img = _scene()
    for image in (img, img[..., 1].copy()):               # colour (max-gradient channel) and grey
        ours = canny(image, *thresholds)
        ref = cv2.Canny(image, *thresholds)
        assert ours.shape == image.shape[:2] + (3,) and ours.dtype == np.uint8
        assert (ours[..., 0] == ours[..., 2]).all()
        mismatch = int((ours[..., 0] != ref).sum())
        print(f"\ncanny {thresholds} {image.ndim}-d: {int((ref > 0).sum())} edge pixels, {mismatch} differ")
        assert mismatch == 0


def test_canny_of_a_step_is_one_line():
    img = np.zeros((32, 32), np.uint8)
    img[:, 16:] = 255
    edges = canny(img)[..., 0] > 0
    assert edges.any(axis=1).all() and (edges.sum(axis=1) == 1).all()     # one pixel per row, every row
    assert set(np.nonzero(edges)[1]) <= {15, 16}


PEOPLE = {
    "canvas_width": 512, "canvas_height": 768,
    "people": [
        {"pose_keypoints_2d": [v for x, y in [(256, 120), (256, 200), (200, 200), (180, 300), (170, 390),
                                              (312, 200), (332, 300), (342, 390), (220, 400), (215, 530),
                                              (210, 660), (292, 400), (297, 530), (302, 660), (240, 105),
                                              (272, 105), (225, 115), (0, 0)]
                               for v in (x, y, 0.9 if (x, y) != (0, 0) else 0.0)]},
        # BODY_25, partly outside the canvas (a raised arm leaves the top edge)
        {"pose_keypoints_2d": [v for i in range(25) for v in (420 + 10 * (i % 3), -30 + 35 * i, 1.0)]},
    ],
}


def _reference_skeleton(people, h, w, canvas):
    """controlnet_aux's draw_bodypose, restated with OpenCV: limbs (ellipse2Poly, 60%), then joints."""
    cv2 = pytest.importorskip("cv2")
    out = np.zeros((h, w, 3), np.uint8)
    scaled = [(p[:, :2] * (w / canvas[0], h / canvas[1]), p[:, 2] > 0) for p in people]
    for xy, ok in scaled:
        for k, (a, b) in enumerate(LIMBS):
            if ok[a] and ok[b]:
                (x0, y0), (x1, y1) = xy[a], xy[b]
                angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
                poly = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)),
                                        (int(math.hypot(x0 - x1, y0 - y1) / 2), 4), int(angle), 0, 360, 1)
                cv2.fillConvexPoly(out, poly, [int(c * 0.6) for c in COLOURS[k]])
    for xy, ok in scaled:
        for k in range(18):
            if ok[k]:
                cv2.circle(out, (int(xy[k, 0]), int(xy[k, 1])), 4, COLOURS[k], thickness=-1)
    return out


def test_pose_skeleton_drawing():
    people, canvas = read_pose(PEOPLE)
    assert canvas == (512, 768) and [p.shape for p in people] == [(18, 3), (18, 3)]
    h, w = 192, 128
    image = draw_pose(people, h, w, canvas)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert (image == draw_pose(people, h, w, canvas)).all()                # deterministic
    # Only the palette: joint colours, limb colours at 60%, black (no anti-aliasing blends).
    palette = {tuple(c) for c in COLOURS} | {tuple(int(v * 0.6) for v in c) for c in COLOURS} | {(0, 0, 0)}
    assert {tuple(c) for c in image.reshape(-1, 3)} <= palette
    assert (image[..., :].max(axis=-1) > 0).mean() > 0.02
    # Joint 17 (left ear, confidence 0) is missing: its colour appears only through person 2.
    ref = _reference_skeleton(people, h, w, canvas)
    drawn, ref_drawn = image.max(-1) > 0, ref.max(-1) > 0
    overlap = (drawn & ref_drawn).sum() / (drawn | ref_drawn).sum()
    same = (image == ref).all(-1).mean()
    print(f"\npose vs OpenCV re-statement: drawn-area IoU {overlap:.3f}, identical pixels {same:.4f}")
    assert overlap > 0.9 and same > 0.98


def test_pose_formats_and_normalised_coordinates():
    coco17 = {"people": [{"pose_keypoints_2d": [v for i in range(17) for v in (0.3 + 0.02 * i, 0.1 + 0.05 * i, 1)]}]}
    (person,), canvas = read_pose(coco17)
    assert canvas is None and person.shape == (18, 3)
    np.testing.assert_allclose(person[1, :2], (person[2, :2] + person[5, :2]) / 2)   # neck between the shoulders
    image = draw_pose([person], 64, 64)                                               # [0, 1] coordinates
    assert (image.max(-1) > 0).sum() > 50


def test_control_image_inputs(tmp_path):
    img = _scene(90, 120)
    Image.fromarray(img).save(tmp_path / "photo.png")
    (tmp_path / "pose.json").write_text(json.dumps(PEOPLE))
    plain = control_image(tmp_path / "photo.png", 64, 96)
    assert plain.shape == (64, 96, 3) and plain.dtype == np.float32 and 0 <= plain.min() and plain.max() <= 1
    expected = np.asarray(Image.fromarray(img).resize((96, 64), Image.Resampling.LANCZOS)) / 255.0
    np.testing.assert_allclose(plain, expected, atol=1e-7)
    edges = control_image(img, 64, 96, preprocessor="canny", low=50, high=100)
    assert set(np.unique(edges)) <= {0.0, 1.0} and edges.any()
    pose = control_image(str(tmp_path / "pose.json"), 64, 96)
    assert pose.shape == (64, 96, 3) and pose.any()


@pytest.mark.parametrize("case,message", [
    ("unknown", "unknown control preprocessor"),
    ("pose-from-image", "pass a .json file"),
    ("bad-json", "is not valid JSON"),
    ("not-openpose", "expected OpenPose keypoint JSON"),
    ("wrong-count", "expected 18"),
    ("unreadable", "cannot be read"),
])
def test_control_image_errors(tmp_path, case, message):
    (tmp_path / "bad.json").write_text("{people: ]")
    (tmp_path / "other.json").write_text('{"keypoints": []}')
    (tmp_path / "few.json").write_text('{"people": [{"pose_keypoints_2d": [1, 2, 1, 3, 4, 1]}]}')
    (tmp_path / "broken.png").write_bytes(b"not a png")
    args = {"unknown": (np.zeros((8, 8, 3), np.uint8), {"preprocessor": "depth"}),
            "pose-from-image": (np.zeros((8, 8, 3), np.uint8), {"preprocessor": "pose"}),
            "bad-json": (tmp_path / "bad.json", {}), "not-openpose": (tmp_path / "other.json", {}),
            "wrong-count": (tmp_path / "few.json", {}), "unreadable": (tmp_path / "broken.png", {})}[case]
    with pytest.raises(ConfigError, match=message) as e:
        control_image(args[0], 32, 32, **args[1])
    assert "\n" not in str(e.value)
