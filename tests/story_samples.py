"""A small two-character story shared by the end-to-end tests (7 panels, captions, an [NC] panel), and OpenPose
keypoints to pose its panels with (the ControlNet tests)."""

STORY = """[Ana] a girl with a yellow scarf
[Bo] a small brown dog

[Ana] reads a book #Monday.
[Bo] sleeps on a rug
[Ana] walks in the park #Tuesday.
[Bo] chases a ball
[Ana] and [Bo] run to the sea #Wednesday.
[NC] waves on a beach at night
[Ana] laughs #The end.
"""

# COCO-18 joints of a standing figure in [0, 1] image coordinates (nose, neck, right arm, left arm, right leg,
# left leg, eyes, ears).
_FIGURE = [(0.50, 0.16), (0.50, 0.28), (0.40, 0.29), (0.36, 0.44), (0.34, 0.58), (0.60, 0.29), (0.64, 0.44),
           (0.66, 0.58), (0.44, 0.58), (0.43, 0.76), (0.42, 0.94), (0.56, 0.58), (0.57, 0.76), (0.58, 0.94),
           (0.48, 0.14), (0.52, 0.14), (0.46, 0.15), (0.54, 0.15)]


def pose(k: int) -> dict:
    """OpenPose keypoint JSON of one figure, moved sideways and its right arm raised by `k` (distinct poses)."""
    points = [(x + 0.08 * (k % 3) - 0.08, y) for x, y in _FIGURE]
    points[3], points[4] = (points[3][0], 0.44 - 0.1 * k), (points[4][0], 0.58 - 0.2 * k)
    return {"people": [{"pose_keypoints_2d": [v for x, y in points for v in (x, y, 1.0)]}]}
