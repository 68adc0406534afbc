"""Writing and reading short RGB clips: H.264 `.mp4` (PyAV), `.gif` (Pillow) or a folder of PNGs.

The format follows the path: `.mp4`, `.gif`, or a trailing separator (or an existing directory) for a
folder of `frame_0000.png`, `frame_0001.png`, ... Every write is atomic: the clip is written under a
temporary name beside the target and renamed into place with `os.replace`, so an interrupted or
failed write leaves neither a partial file nor a damaged earlier output.

Format notes:
* mp4: H.264 (libx264, shipped inside PyAV's wheels), yuv420p so every player can show it, CRF 18
  (visually near-lossless; x264's default is 23), preset "medium", `+faststart` so browsers can start
  playing before the download ends. yuv420p subsamples chroma 2x2, so both sides must be even: an odd
  width/height is padded by repeating the last column/row, and `read_video` returns the padded size.
  RGB -> YUV is swscale's default BT.601 limited-range matrix, and the stream is tagged so.
* gif: 256-colour palette per frame (adaptive), loops forever, frame delay 1000/fps ms (GIF stores
  centiseconds; browsers slow down delays under 20 ms, i.e. fps > 50). Pillow stores a run of identical
  consecutive frames as one frame showing for the run's total time, so such a run reads back as one.
* folder: lossless PNGs, for further processing.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from fractions import Fraction

import numpy as np
from PIL import Image, ImageSequence

from .errors import ConfigError
from .outputs import staging_dir, staging_file

FORMATS = (".mp4", ".gif", "a folder (path ending in '/')")
_FRAME_NAME = re.compile(r"^frame_(\d+)\.png$")
MP4_CRF = 18


def _kind(path: str) -> str:
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext in (".mp4", ".gif"):
        return ext[1:]
    raise ConfigError(f"{path}: unknown video format {ext or '(no extension)'!r}; use one of: {', '.join(FORMATS)}")


def _as_rgb(frame, index: int) -> np.ndarray:
    """One frame -> uint8 [H, W, 3]; PIL images of any mode are converted to RGB."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise ConfigError(f"frame {index}: dtype {arr.dtype}; frames must be uint8 RGB in 0..255 "
                          "(convert with np.clip(x * 255, 0, 255).astype(np.uint8))")
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"frame {index}: shape {arr.shape}; frames must be [height, width, 3] RGB")
    return arr


def _frames(frames) -> Iterable[np.ndarray]:
    """Validated frames, one at a time (a generator input is never held in memory whole)."""
    size = None
    count = 0
    for i, frame in enumerate(frames):
        arr = _as_rgb(frame, i)
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise ConfigError(f"frame {i}: size {arr.shape[1]}x{arr.shape[0]} differs from frame 0's "
                              f"{size[1]}x{size[0]}; all frames of a video must have one size")
        count += 1
        yield arr
    if count == 0:
        raise ConfigError("no frames to write; a video needs at least one frame")


def _write_mp4(frames: Iterable[np.ndarray], target, fps: float) -> None:
    import av

    container = av.open(target, mode="w", format="mp4", options={"movflags": "+faststart"})
    try:
        stream = None
        for arr in frames:
            if stream is None:
                h, w = arr.shape[:2]
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = w + w % 2, h + h % 2
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(MP4_CRF), "preset": "medium"}
                # Tag what swscale's default conversion does (BT.601 matrix, limited range), so players
                # do not guess BT.709 for HD sizes and shift the colours.
                stream.codec_context.colorspace = 6      # AVCOL_SPC_SMPTE170M
                stream.codec_context.color_range = 1     # AVCOL_RANGE_MPEG
            if arr.shape[0] % 2 or arr.shape[1] % 2:
                arr = np.pad(arr, ((0, arr.shape[0] % 2), (0, arr.shape[1] % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    except BaseException:
        # Keep the caller's error, not whatever closing a half-written container reports.
        try:
            container.close()
        except Exception:
            pass
        raise
    container.close()


def _write_gif(frames: Iterable[np.ndarray], target, fps: float) -> None:
    images = [Image.fromarray(a) for a in frames]
    images[0].save(target, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000.0 / fps)), optimize=False)


def _write_folder(frames: Iterable[np.ndarray], folder: str) -> None:
    for i, arr in enumerate(frames):
        Image.fromarray(arr).save(os.path.join(folder, f"frame_{i:04d}.png"))


def _replace_folder(tmp: str, target: str) -> None:
    """Move the finished folder into place. An earlier frame folder is replaced; anything else is kept."""
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ConfigError(f"{target}: exists and is not a folder; remove it or choose another output path")
        others = [n for n in os.listdir(target) if not _FRAME_NAME.match(n)]
        if others:
            raise ConfigError(f"{target}: folder exists and holds other files (e.g. {others[0]!r}); "
                              "choose a new or empty folder for the frames")
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.old.")
        os.replace(target, os.path.join(old, "frames"))
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(os.path.join(old, "frames"), target)  # put the earlier output back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_video(frames, path: str | os.PathLike, fps: float = 8) -> str:
    """Write frames (uint8 [T, H, W, 3], or a list/iterable of PIL images or HxWx3 uint8 arrays) to `path`.

    `.mp4` -> H.264, `.gif` -> looping GIF, path ending in '/' -> folder of PNGs (module docstring).
    Returns the written path. Atomic: on any error nothing is left behind and an existing output is
    untouched.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 240:
        raise ConfigError(f"fps={fps!r}: frames per second must be a number in (0, 240]")
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ConfigError(f"frames have shape {frames.shape}; expected [frames, height, width, 3] uint8 RGB")
    target = os.path.abspath(path.rstrip("/" + os.sep) if kind == "folder" else path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ConfigError(f"{path}: folder {parent} does not exist; create it first")
    name = os.path.basename(target)
    # Take the first frame before creating anything: an empty input fails with nothing to clean up.
    checked = _frames(frames)
    frames = itertools.chain([next(checked)], checked)
    if kind == "folder":
        tmp = staging_dir(parent, f".{name}.tmp.")
        try:
            _write_folder(_frames(frames), tmp)
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target + os.sep
    fd, tmp = staging_file(parent, f".{name}.", ".tmp")
    os.close(fd)
    try:
        (_write_mp4 if kind == "mp4" else _write_gif)(_frames(frames), tmp, fps)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def _first_line(e: BaseException) -> str:
    # FFmpeg errors repeat the path in str(e); their strerror is the useful part.
    if isinstance(getattr(e, "strerror", None), str):
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_folder(folder: str) -> list[np.ndarray]:
    numbered = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := _FRAME_NAME.match(n)))
    if not numbered:
        raise ConfigError(f"{folder}: no frame_NNNN.png files in this folder")
    frames = []
    for _, n in numbered:
        with Image.open(os.path.join(folder, n)) as im:
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def _read_gif(path: str) -> list[np.ndarray]:
    with Image.open(path) as im:
        if im.format != "GIF":
            raise ConfigError(f"{path}: not a GIF file (it is {im.format}); rename it or convert it")
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


def _read_mp4(path: str) -> list[np.ndarray]:
    import av

    with av.open(path, mode="r") as container:
        if not container.streams.video:
            raise ConfigError(f"{path}: no video stream found; the file is truncated, corrupt or audio-only")
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def read_video(path: str | os.PathLike) -> np.ndarray:
    """A clip written by `write_video` (or any .mp4/.gif/PNG-frame folder) -> uint8 [T, H, W, 3].

    Unreadable or corrupt input -> ConfigError with one line.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or folder")
    try:
        frames = {"folder": _read_folder, "gif": _read_gif, "mp4": _read_mp4}[kind](path)
    except ConfigError:
        raise
    except Exception as e:  # PIL / FFmpeg report corrupt data with many exception types
        raise ConfigError(f"{path}: cannot read this {kind} ({_first_line(e)}); the file is corrupt or "
                          "truncated: write it again") from None
    if not frames:
        raise ConfigError(f"{path}: holds no video frames; the file is empty or truncated: write it again")
    if len({f.shape for f in frames}) > 1:
        raise ConfigError(f"{path}: frames differ in size; not a clip read_video can return as one array")
    return np.stack(frames)
