"""storydiff_jax/faces.py (the `--face-model` runner of insightface's buffalo_l pack) on tiny ONNX models built
here, since no real weights exist: a detector with SCRFD's 9 outputs whose stride-8 scores fire on a bright
8 x 8 cell and whose box / keypoint outputs are constants, and a recognizer (16 x 16 average pooling, then a
random 147 -> 512 projection). The keypoints are a known similarity image of ArcFace's template, so the
expected aligned crop is computed here independently (inverse map + bilinear sampling with
jax.scipy.ndimage.map_coordinates), pushed through the same recognizer, and compared.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from storydiff_jax import faces  # noqa: E402
from storydiff_jax.errors import ConfigError  # noqa: E402

SIZE = 640
CELL = (25, 20)                 # (x, y) of the bright stride-8 cell: anchor centre (200, 160)
ANGLE, SCALE, SHIFT = np.deg2rad(12.0), 1.7, np.array([130.0, 75.0])


def _template_to_photo() -> np.ndarray:
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    return np.array([[SCALE * c, -SCALE * s, SHIFT[0]], [SCALE * s, SCALE * c, SHIFT[1]]])


def _keypoints() -> np.ndarray:
    m = _template_to_photo()
    return faces.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]


def _detector(path):
    centre = np.array([CELL[0] * 8, CELL[1] * 8], np.float64)
    kps = ((_keypoints() - centre) / 8).reshape(-1)
    nodes, inits, outputs = [], [], []
    for kind, channels in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in faces.STRIDES:
            name = f"{kind}_{stride}"
            weight = np.zeros((2 * channels, 3, stride, stride), np.float32)
            bias = np.zeros((2 * channels,), np.float32)
            if kind == "score":
                if stride == 8:   # sigmoid(20 * mean - 10): ~1 on a white cell, ~0 elsewhere
                    weight[:] = 20.0 / (3 * stride * stride)
                    bias[:] = -10.0
                else:
                    bias[:] = -10.0
            elif kind == "bbox":
                bias[:] = np.tile([3.0, 4.0, 3.0, 5.0], 2)
            else:
                bias[:] = np.tile(kps, 2)
            inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
            nodes += [helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_c"],
                                       strides=[stride, stride]),
                      helper.make_node("Transpose", [f"{name}_c"], [f"{name}_t"], perm=[0, 2, 3, 1])]
            inits.append(numpy_helper.from_array(np.array([-1, channels], np.int64), f"{name}_shape"))
            last = f"{name}_r" if kind == "score" else name
            nodes.append(helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [last]))
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, None, None])],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _recognizer(path, projection):
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "proj"], ["683"])]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
                              [numpy_helper.from_array(projection, "proj")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("buffalo_l")
    projection = np.random.default_rng(0).standard_normal((147, 512)).astype(np.float32)
    _detector(folder / faces.DETECTOR)
    _recognizer(folder / faces.RECOGNIZER, projection)
    return folder, projection


def _photo():
    rng = np.random.default_rng(1)
    photo = (rng.uniform(0, 90, (SIZE, SIZE, 3))).astype(np.uint8)   # dark texture: no cell reaches the threshold
    x, y = CELL[0] * 8, CELL[1] * 8
    photo[y:y + 8, x:x + 8] = 255                                 # the stride-8 cell of that anchor
    return photo


def test_detect_align_embed(pack):
    import jax.numpy as jnp
    from jax.scipy.ndimage import map_coordinates

    folder, projection = pack
    embedder = faces.FaceEmbedder(folder)
    photo = _photo()
    boxes, scores, points = embedder.detect(photo, SIZE)
    assert len(boxes) == 1 and scores[0] > 0.99                   # two anchors of one cell: NMS keeps one
    np.testing.assert_allclose(boxes[0], [200 - 24, 160 - 32, 200 + 24, 160 + 40], atol=1e-4)
    np.testing.assert_allclose(points[0], _keypoints(), atol=1e-3)
    # the aligned crop, stated here: crop pixel (x, y) samples the photo at template->photo (x, y)
    m = _template_to_photo()
    ys, xs = np.mgrid[:112, :112].astype(np.float64)
    px, py = m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    crop = np.stack([np.asarray(map_coordinates(jnp.asarray(photo[..., c], jnp.float32), [py, px], order=1,
                                                mode="constant", cval=0.0)) for c in range(3)], -1)
    pooled = ((crop - 127.5) / 127.5).transpose(2, 0, 1).reshape(3, 7, 16, 7, 16).mean(axis=(2, 4)).reshape(-1)
    want = pooled @ projection
    got = embedder.embed(photo)
    assert got.shape == (512,)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_no_face_and_folder_errors(pack, tmp_path):
    from PIL import Image

    folder, _ = pack
    embedder = faces.FaceEmbedder(folder)
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(tmp_path / "dark.png")
    Image.fromarray(_photo()).save(tmp_path / "face.png")
    rows = embedder.embed_photos([tmp_path / "face.png", tmp_path / "dark.png"])
    assert rows.shape == (2, 512) and np.all(np.isfinite(rows[0])) and np.all(np.isnan(rows[1]))
    with pytest.raises(ConfigError, match="lacks det_10g.onnx and w600k_r50.onnx"):
        faces.FaceEmbedder(tmp_path)
    (tmp_path / faces.DETECTOR).write_bytes(b"not onnx")
    (tmp_path / faces.RECOGNIZER).write_bytes(b"not onnx")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        faces.FaceEmbedder(tmp_path)


def test_similarity_transform_and_resize():
    m = _template_to_photo()
    np.testing.assert_allclose(faces.similarity_transform(faces.ARCFACE_TEMPLATE, _keypoints()), m, atol=1e-9)
    img = np.random.default_rng(2).uniform(0, 255, (6, 8, 3))
    np.testing.assert_array_equal(faces.resize_bilinear(img, 8, 6), img)
    half = faces.resize_bilinear(img, 4, 3)                       # 2x down: averages of 2x2 blocks
    np.testing.assert_allclose(half, img.reshape(3, 2, 4, 2, 3).mean(axis=(1, 3)), atol=1e-12)
