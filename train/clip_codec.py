"""How a WebVid build stores a clip's frames: `raw`, `jpeg` or `h264` (`build-webvid --frames-format`).

    raw    uint8 [L, R, R, 3] as a zlib'd tensor: lossless, 3.1 MB per 16 x 256² clip before zlib.
    jpeg   one JPEG per frame (PIL / libjpeg-turbo, 4:4:4 chroma, `--jpeg-quality`, default 95).
    h264   the clip re-encoded as one H.264 stream at the stored resolution (libx264 through PyAV, 4:4:4
           chroma, constant quality `--h264-crf`, default 15, one encoder thread: the same clip gives the
           same bytes on every worker).

Why 4:4:4 in both: at 4:2:0 the chroma subsampling alone caps a natural clip near 37 dB PSNR (measured in
docs/training.md), whatever the quality setting. The measured sizes, quality and decode costs of the three
are in docs/training.md ("Frame formats"); `h264` is the default there for its size (a fraction of JPEG's
at the same PSNR) at a decode cost far below what one train step needs per clip.

The codec is a small frozen value: the builder encodes with it in its workers, the build's summary
records it (`webvid_build.json`: "frames_format"), and `WebVidSource` decodes with it, in whatever
process reads the record (grain's worker processes with `make_loader(workers=N)`). Builds written before
this option existed have no "frames_format" and are raw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from storydiff_jax.errors import ConfigError

FORMATS = ("raw", "jpeg", "h264")
DEFAULT_FORMAT = "h264"
DEFAULT_JPEG_QUALITY = 95
DEFAULT_H264_CRF = 15
_FIELD = {"raw": "frames", "jpeg": "jpeg_frames", "h264": "h264_frames"}


@dataclass(frozen=True)
class FrameCodec:
    format: str = DEFAULT_FORMAT
    quality: int | None = None      # jpeg: JPEG quality 1-100; h264: x264 CRF 0-51 (lower is better); raw: None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"--frames-format {self.format!r}: choose one of {', '.join(FORMATS)}")
        default = {"raw": None, "jpeg": DEFAULT_JPEG_QUALITY, "h264": DEFAULT_H264_CRF}[self.format]
        quality = default if self.quality is None or self.format == "raw" else self.quality
        object.__setattr__(self, "quality", quality)
        bad = isinstance(quality, bool) or (quality is not None and not isinstance(quality, int))
        if self.format == "jpeg" and (bad or not 1 <= quality <= 100):
            raise ConfigError(f"--jpeg-quality {quality!r}: must be an integer in 1..100 (default "
                              f"{DEFAULT_JPEG_QUALITY})")
        if self.format == "h264" and (bad or not 0 <= quality <= 51):
            raise ConfigError(f"--h264-crf {quality!r}: must be an integer in 0..51, lower is better (default "
                              f"{DEFAULT_H264_CRF})")

    # -- naming and description --

    @property
    def field(self) -> str:
        """The record's feature that holds the frames."""
        return _FIELD[self.format]

    @property
    def suffix(self) -> str:
        """Part of the build's config name: builds of other formats sit side by side ("" for raw, as
        before formats existed)."""
        return {"raw": "", "jpeg": f"_jpeg_q{self.quality}", "h264": f"_h264_crf{self.quality}"}[self.format]

    def describe(self) -> dict:
        return {"format": self.format, **({} if self.quality is None else {"quality": self.quality})}

    @classmethod
    def from_summary(cls, summary: dict) -> FrameCodec:
        d = summary.get("frames_format") or {"format": "raw"}
        return cls(d["format"], d.get("quality"))

    def feature(self, frames: int, resolution: int):
        """The TFDS feature of the frames (none of them needs TensorFlow: bytes and zlib'd tensors)."""
        import tensorflow_datasets as tfds

        if self.format == "raw":
            return tfds.features.Tensor(shape=(frames, resolution, resolution, 3), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.ZLIB)
        return tfds.features.Tensor(shape=(frames,) if self.format == "jpeg" else (), dtype=np.object_)

    # -- the work --

    def encode(self, clip: np.ndarray):
        """uint8 [L, R, R, 3] -> the value stored in the record."""
        if self.format == "raw":
            return clip
        if self.format == "jpeg":
            return np.array([_jpeg(frame, self.quality) for frame in clip], dtype=object)
        return _h264(clip, self.quality)

    def decode(self, value, frames: int, resolution: int) -> np.ndarray:
        """The stored value -> uint8 [L, R, R, 3]."""
        if self.format == "raw":
            return np.asarray(value)
        if self.format == "jpeg":
            from PIL import Image

            clip = np.stack([np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in value])
        else:
            clip = _decode_h264(bytes(value))
        if clip.shape != (frames, resolution, resolution, 3):
            raise ConfigError(f"a {self.format} clip decoded to shape {clip.shape}, the build says "
                              f"{(frames, resolution, resolution, 3)}; the build is damaged: rebuild it")
        return clip


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, "JPEG", quality=quality, subsampling=0)   # 0: 4:4:4
    return out.getvalue()


def _h264(clip: np.ndarray, crf: int) -> bytes:
    """An Annex B H.264 stream (no container: the record knows L and R) of the clip, all frames kept."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=8)    # the rate is not used: frames are read by index
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv444p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _decode_h264(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data), format="h264") as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"   # a 16-frame clip: threads cost more than they give; workers parallelise
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
