"""Face identity descriptors with dlib (optional: `pip install 'storydiff-jax[face-metrics]'`).

dlib's pipeline, as the `face_recognition` package runs it by default: the HOG frontal face detector
(image upsampled once, so faces down to ~40 px are found), the 5-point landmark model to align the face
crop, and the ResNet-29 metric network that maps an aligned face to a 128-d descriptor (99.38% on LFW;
distances < 0.6 mean "same person"). The weights are the real pretrained ones the
`face-recognition-models` package ships; dlib comes from the `dlib-bin` wheels.

The package's `__init__` imports `pkg_resources` (setuptools, absent from bare virtual environments and
removed from recent setuptools), so its `models/` folder is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..errors import ConfigError

_INSTALL = ("install the face-metrics extra: pip install 'storydiff-jax[face-metrics]' "
            "(dlib-bin + face-recognition-models)")
LANDMARKS = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"


def models_folder() -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"face identity needs dlib's face models: {_INSTALL}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    for name in (LANDMARKS, DESCRIPTOR):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ConfigError(f"face-recognition-models is installed without {name}; reinstall it ({_INSTALL})")
    return folder


class FaceEmbedder:
    """128-d dlib descriptor of the largest face in an image, or None where no face is found."""

    name = "dlib-resnet-v1"

    def __init__(self, upsample: int = 1):
        try:
            import dlib
        except ImportError:
            raise ConfigError(f"face identity needs dlib: {_INSTALL}") from None
        folder = models_folder()
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(os.path.join(folder, LANDMARKS))
        self._descriptor = dlib.face_recognition_model_v1(os.path.join(folder, DESCRIPTOR))
        self.upsample = upsample

    def describe(self, image) -> np.ndarray | None:
        """uint8 [H, W, 3] RGB (or PIL) -> float64 [128], or None."""
        pixels = np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3])
        faces = self._detector(pixels, self.upsample)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._landmarks(pixels, face)
        return np.asarray(self._descriptor.compute_face_descriptor(pixels, shape), np.float64)
