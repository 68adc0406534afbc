"""storydiff_jax.video_io: round trips for .mp4 / .gif / PNG folders, odd sizes, errors, atomic writes.

mp4 is lossy (H.264 CRF 18, 4:2:0 chroma). On `moving_clip` (a smooth pattern that moves several pixels per
frame) the measured mean absolute error is 1.5-1.7 / 255 per frame (max 10), while neighbouring source frames
differ by 23-27 on average (33 for the clip shifted by one frame): the test bounds the error at 3 and checks that
each decoded frame's nearest source frame is itself, so a dropped, repeated or reordered frame fails. GIF (<= 256
colours per frame) and PNG round trips are exact.
"""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
from PIL import Image

from storydiff_jax.errors import ConfigError
from storydiff_jax.video_io import read_video, write_video

MP4_MEAN_TOL = 3.0


def gradient_clip(t=8, h=64, w=64):
    """A smooth moving colour gradient: the kind of content a video model produces."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([xx * 3 + i * 4, yy * 3, (xx + yy) * 2 - i * 3], -1).clip(0, 255)
                     for i in range(t)]).astype(np.uint8)


def moving_clip(t=8, h=64, w=64, step=6):
    """A smooth luminance pattern moving `step` pixels per frame over colour ramps: little chroma detail (4:2:0
    keeps it), a lot of motion (each frame is far from its neighbours)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for i in range(t):
        lum = 128 + 80 * np.sin(2 * np.pi * (xx - step * i) / 48) * np.cos(2 * np.pi * (yy + step * i) / 64)
        frames.append(np.stack([lum + xx * 0.6 - 20, lum + yy * 0.6 - 20, lum], -1))
    return np.stack(frames).round().clip(0, 255).astype(np.uint8)


def palette_clip(t=5, h=20, w=31, colours=200, seed=0):
    """Random pixels drawn from 200 colours: fits a GIF palette, so the GIF round trip must be exact."""
    rng = np.random.default_rng(seed)
    pal = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return pal[rng.integers(0, colours, (t, h, w))]


def listing(folder):
    return sorted(os.listdir(folder))


# --- round trips -----------------------------------------------------------------------------------


def test_mp4_round_trip(tmp_path):
    clip = moving_clip()
    path = write_video(clip, tmp_path / "clip.mp4", fps=8)
    assert path == str(tmp_path / "clip.mp4") and listing(tmp_path) == ["clip.mp4"]
    back = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    diff = np.abs(back.astype(np.int32) - clip)
    # distance[k, j]: mean abs difference of decoded frame k and source frame j.
    distance = np.abs(back[:, None].astype(np.int32) - clip[None]).mean(axis=(2, 3, 4))
    others = np.where(np.eye(len(clip), dtype=bool), np.inf, distance).min(1)
    print(f"\nmp4 round trip: mean abs error {diff.mean():.3f} / 255 (per frame {np.diag(distance).min():.2f}.."
          f"{np.diag(distance).max():.2f}), max {diff.max()}; nearest other source frame {others.min():.1f} away")
    assert diff.mean() <= MP4_MEAN_TOL and np.diag(distance).max() <= MP4_MEAN_TOL
    np.testing.assert_array_equal(distance.argmin(1), np.arange(len(clip)), "a decoded frame is nearest another frame")
    assert np.all(others > 5 * np.diag(distance)), "source frames too alike for the check to see a shifted frame"
    with av.open(path) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert s.average_rate == 8 and s.frames == len(clip)


def test_mp4_fractional_fps(tmp_path):
    path = write_video(gradient_clip(t=3), tmp_path / "c.mp4", fps=7.5)
    with av.open(path) as c:
        assert c.streams.video[0].average_rate == 7.5


def test_mp4_odd_sizes_are_padded_by_edge_repeat(tmp_path):
    # A dark picture with a light last row and column: repeating the edge (what we do) and reflecting it (which
    # would copy the dark row/column before it) give padding ~200 apart.
    clip = gradient_clip(t=4, h=33, w=47) // 3
    clip[:, -1, :] = clip[:, :, -1] = 240
    back = read_video(write_video(clip, tmp_path / "odd.mp4")).astype(np.int32)
    assert back.shape == (4, 34, 48, 3)
    diff = np.abs(back[:, :33, :47] - clip)
    row, col = back[:, 33, :47], back[:, :33, 47]
    repeat = np.abs(row - clip[:, 32]).mean(), np.abs(col - clip[:, :, 46]).mean()
    reflect = np.abs(row - clip[:, 31]).mean(), np.abs(col - clip[:, :, 45]).mean()
    print(f"\nmp4 odd size: mean abs error {diff.mean():.3f} / 255; added row/column vs the last one "
          f"{repeat[0]:.2f}/{repeat[1]:.2f}, vs the one before it {reflect[0]:.1f}/{reflect[1]:.1f}")
    assert diff.mean() <= MP4_MEAN_TOL
    # The added row/column repeats the last one of the picture, not the one before it (a reflection).
    assert max(repeat) <= MP4_MEAN_TOL and min(reflect) >= 100


def test_gif_round_trip_is_exact_and_loops(tmp_path):
    clip = palette_clip()
    path = write_video(clip, tmp_path / "clip.gif", fps=10)
    back = read_video(path)
    assert back.shape == clip.shape
    np.testing.assert_array_equal(back, clip)
    with Image.open(path) as im:
        assert im.info["loop"] == 0 and im.info["duration"] == 100 and im.n_frames == len(clip)


def test_gif_identical_frames_merge_into_one_longer_frame(tmp_path):
    # Documented Pillow behaviour: playback time is kept, the frame count is not.
    clip = palette_clip(t=3)
    clip = np.stack([clip[0], clip[1], clip[1], clip[1], clip[2]])
    path = write_video(clip, tmp_path / "runs.gif", fps=10)
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations == [100, 300, 100]
    np.testing.assert_array_equal(read_video(path), clip[[0, 1, 4]])


def test_folder_round_trip_and_pil_inputs(tmp_path):
    clip = palette_clip(t=3, h=9, w=7)
    images = [Image.fromarray(clip[0]), Image.fromarray(clip[1]).convert("RGBA"), Image.fromarray(clip[2])]
    path = write_video(images, str(tmp_path / "frames") + "/")
    assert path == str(tmp_path / "frames") + os.sep
    assert listing(path) == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert listing(tmp_path) == ["frames"]
    np.testing.assert_array_equal(read_video(path), clip)
    # Rewriting replaces the earlier frames (no stale frame_0002.png from the longer clip).
    write_video(clip[:2], path)
    assert listing(path) == ["frame_0000.png", "frame_0001.png"] and listing(tmp_path) == ["frames"]
    np.testing.assert_array_equal(read_video(tmp_path / "frames"), clip[:2])


def test_generator_input_and_extension_case(tmp_path):
    clip = gradient_clip(t=3, h=16, w=16)
    back = read_video(write_video((f for f in clip), tmp_path / "UP.MP4"))
    assert back.shape == clip.shape


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip.avi", "clip.webm", "clip"])
def test_unknown_format_names_the_allowed_ones(tmp_path, name):
    for call in (lambda: write_video(gradient_clip(t=2), tmp_path / name), lambda: read_video(tmp_path / name)):
        with pytest.raises(ConfigError, match=r"unknown video format .*\.mp4, \.gif, a folder") as info:
            call()
        assert "\n" not in str(info.value)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("frames, words", [
    (np.zeros((2, 8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((2, 8, 8), np.uint8), r"expected \[frames, height, width, 3\]"),
    ([np.zeros((8, 8, 4), np.uint8)], r"must be \[height, width, 3\]"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], "differs from frame 0"),
    ([], "no frames"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
])
@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v/"])
def test_bad_frames_raise_and_leave_nothing(tmp_path, frames, words, name):
    with pytest.raises(ConfigError, match=words) as info:
        write_video(frames, os.path.join(tmp_path, name))
    assert "\n" not in str(info.value)
    assert listing(tmp_path) == []


def test_bad_fps_and_missing_parent(tmp_path):
    for fps in (0, -1, float("nan"), "8", True):
        with pytest.raises(ConfigError, match="fps"):
            write_video(gradient_clip(t=2), tmp_path / "v.gif", fps=fps)
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        write_video(gradient_clip(t=2), tmp_path / "nope" / "v.mp4")
    assert listing(tmp_path) == []


def test_unreadable_inputs_raise_one_line(tmp_path):
    good = (tmp_path / "good.mp4")
    write_video(gradient_clip(), good)
    data = good.read_bytes()
    junk = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    cases = {
        "missing.mp4": None,
        "junk.mp4": junk,
        "head.mp4": data[:100],
        "half.mp4": data[: len(data) // 2],
        "junk.gif": junk,
        "png.gif": None,
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    Image.fromarray(gradient_clip(t=1)[0]).save(tmp_path / "png.gif", format="PNG")
    (tmp_path / "empty").mkdir()
    for name in [*cases, "empty/"]:
        with pytest.raises(ConfigError) as info:
            read_video(tmp_path / name)
        msg = str(info.value)
        assert "\n" not in msg and name.rstrip("/") in msg, msg
        print(f"\n{name}: {msg}")


# --- atomic writes ---------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def failing_frames(n_good=3):
    clip = gradient_clip(t=n_good, h=16, w=16)
    yield from clip
    raise Boom("producer failed midway")


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v/"])
def test_failure_midway_leaves_nothing(tmp_path, name):
    with pytest.raises(Boom):
        write_video(failing_frames(), os.path.join(tmp_path, name))
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v/"])
def test_failure_keeps_the_earlier_output(tmp_path, name):
    first = palette_clip(t=2, h=16, w=16)
    write_video(first, os.path.join(tmp_path, name))
    before = read_video(tmp_path / name)
    with pytest.raises(Boom):
        write_video(failing_frames(), os.path.join(tmp_path, name))
    with pytest.raises(ConfigError, match="differs from frame 0"):
        write_video([first[0], first[0][:8]], os.path.join(tmp_path, name))
    assert listing(tmp_path) == [name.rstrip("/")]
    np.testing.assert_array_equal(read_video(tmp_path / name), before)


def test_folder_with_other_files_is_not_replaced(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        write_video(gradient_clip(t=2), str(out) + "/")
    assert listing(out) == ["notes.txt"] and listing(tmp_path) == ["results"]
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    write_video(gradient_clip(t=2), tmp_path / "empty")
    assert listing(tmp_path / "empty") == ["frame_0000.png", "frame_0001.png"]
