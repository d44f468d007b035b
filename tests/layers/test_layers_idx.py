"""IDX (MNIST-format) loader on small files the tests write; oracle: the bytes written."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from deqppl.data.idx import load_idx_images, load_mnist, read_idx, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_round_trip(tmp_path, dtype, compress):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)


def test_header_is_the_documented_big_endian_layout(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.array([7, 2, 1], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE]))  # int16 big-endian
    assert read_idx(path).tolist() == [258, -2]


def _mnist_dir(tmp_path, n=5, compress=False):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist(tmp_path, compress):
    images, labels = _mnist_dir(tmp_path, compress=compress)
    data = load_mnist(tmp_path, train=True)
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.float32
    assert torch.allclose(data.images[:, 0].double(), torch.from_numpy(images / 255.0),
                          atol=1e-7)  # float32 rounding of k / 255
    assert data.labels.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="no MNIST file t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, train=False)


def test_malformed_and_truncated_files(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.zeros((2, 3, 3), dtype=np.uint8))
    raw = good.read_bytes()
    cases = {
        "short": (raw[:3], "shorter than the 4-byte magic"),
        "magic": (b"\x01" + raw[1:], "does not start with two zero bytes"),
        "type": (raw[:2] + b"\x07" + raw[3:], "unknown type code 0x07"),
        "header": (raw[:10], "truncated in its header"),
        "data": (raw[:-1], "truncated: shape \\(2, 3, 3\\) of uint8 needs 18 data bytes, the file has 17"),
        "extra": (raw + b"\x00", "1 bytes after the data"),
        "gzip": (gzip.compress(raw)[:-6], "cannot be decompressed"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_idx(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_idx(tmp_path / "missing")


def test_inconsistent_image_and_label_files(tmp_path):
    write_idx(tmp_path / "img", np.zeros((4, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "lab", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="has 4 images but label file .* has 3 labels"):
        load_idx_images(tmp_path / "img", tmp_path / "lab")
    write_idx(tmp_path / "flat", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(n, height, width\)"):
        load_idx_images(tmp_path / "flat", tmp_path / "lab")
    write_idx(tmp_path / "neg", np.array([0, -1, 2, 3], dtype=np.int8))
    with pytest.raises(ValueError, match="negative label -1 at position 1"):
        load_idx_images(tmp_path / "img", tmp_path / "neg")
    write_idx(tmp_path / "flt", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="must hold integers"):
        load_idx_images(tmp_path / "img", tmp_path / "flt")
