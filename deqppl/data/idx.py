"""Reading (and writing) IDX files, the format of MNIST and Fashion-MNIST, from a user's disk.

IDX (LeCun et al., the MNIST distribution): two zero bytes, a type code, the number of
dimensions $d$, then $d$ big-endian unsigned 32-bit sizes, then the data in row-major order,
big-endian. Files may be gzip-compressed (``.gz``, detected from the content). Every malformed
or truncated file raises ``ValueError`` naming the file and what is wrong; nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "write_idx", "ImageDataset", "load_idx_images", "load_mnist",
           "MNIST_FILES"]

#: IDX type code -> numpy dtype (big-endian).
_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _TYPES.items()}

#: The standard MNIST file names: (images, labels) of the training and the test split.
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"IDX file {path} does not exist (or is not a file)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"IDX file {path} looks gzip-compressed but cannot be "
                             f"decompressed ({err}); it may be truncated") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    numpy.ndarray
        Native byte order, shape from the header.

    Raises
    ------
    ValueError
        If the file is missing, its magic number or type code is invalid, the header is cut
        short, or the data are shorter or longer than the header says.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte")
    >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
    >>> read_idx(path).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is {len(raw)} bytes long, shorter than the 4-byte "
                         f"magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"IDX file {path} does not start with two zero bytes (got "
                         f"{raw[:2].hex()}): not an IDX file")
    code, ndim = raw[2], raw[3]
    if code not in _TYPES:
        raise ValueError(f"IDX file {path} has unknown type code 0x{code:02x}; valid codes are "
                         f"{', '.join(f'0x{c:02x}' for c in _TYPES)}")
    if ndim == 0:
        raise ValueError(f"IDX file {path} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated in its header: {ndim} dimensions need "
                         f"{header} header bytes, the file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise ValueError(f"IDX file {path} is truncated: shape {shape} of {dtype.name} needs "
                         f"{expected} data bytes, the file has {found}")
    if found > expected:
        raise ValueError(f"IDX file {path} has {found - expected} bytes after the data that its "
                         f"header (shape {shape}) describes; it is malformed")
    data = np.frombuffer(raw, dtype=dtype, offset=header, count=math.prod(shape))
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``).

    Raises
    ------
    TypeError
        If the dtype has no IDX type code (uint8, int8, int16, int32, float32, float64).
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise TypeError(f"dtype {array.dtype} has no IDX type code; use one of "
                        f"{', '.join(str(k) for k in _CODES)}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX arrays need 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, _CODES[native], array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    payload = header + array.astype(_TYPES[_CODES[native]]).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)


@dataclass(frozen=True)
class ImageDataset:
    """Images with integer labels.

    Attributes
    ----------
    images
        ``(n, channels, height, width)`` floating tensor, pixel values scaled to $[0, 1]$.
    labels
        ``(n,)`` int64 classes.
    name
        Where the data came from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_idx_images(images: str | os.PathLike, labels: str | os.PathLike, *,
                    dtype: torch.dtype = torch.float32, max_value: float = 255.0) -> ImageDataset:
    """Load an image IDX file ``(n, H, W)`` and a label IDX file ``(n,)`` as an `ImageDataset`.

    Parameters
    ----------
    images, labels
        Paths of the two files.
    dtype
        Floating dtype of the images.
    max_value
        Pixel values are divided by it (255 for MNIST's bytes).

    Raises
    ------
    ValueError
        For malformed files (`read_idx`), images that are not 3-D, labels that are not 1-D or
        not integers or negative, or counts that differ.
    """
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3:
        raise ValueError(f"image file {images} must hold an array of shape (n, height, width), "
                         f"got shape {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"label file {labels} must hold an array of shape (n,), got shape "
                         f"{y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"label file {labels} must hold integers, got {y.dtype}")
    if len(x) != len(y):
        raise ValueError(f"image file {images} has {len(x)} images but label file {labels} has "
                         f"{len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"label file {labels} has a negative label {int(y.min())} at position "
                         f"{int(np.argmin(y))}")
    if not (isinstance(max_value, (int, float)) and max_value > 0):
        raise ValueError(f"max_value must be a number > 0, got {max_value!r}")
    tensor = torch.from_numpy(x.astype(np.float64) / max_value).to(dtype).unsqueeze(1)
    return ImageDataset(images=tensor, labels=torch.from_numpy(y.astype(np.int64)),
                        name=f"idx:{Path(images).name}")


def load_mnist(directory: str | os.PathLike, *, train: bool = True,
               dtype: torch.dtype = torch.float32) -> ImageDataset:
    """MNIST (or Fashion-MNIST) from the standard IDX files in ``directory``.

    Looks for ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (``train=True``) or
    the ``t10k-`` files, each optionally with a ``.gz`` suffix.

    Raises
    ------
    ValueError
        If a file is missing (naming the names tried) or malformed.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {train!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"MNIST directory {directory} does not exist")
    found = []
    for stem in MNIST_FILES[train]:
        candidates = [directory / stem, directory / f"{stem}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise ValueError(f"no MNIST file {stem} (or {stem}.gz) in {directory}")
        found.append(hit)
    data = load_idx_images(found[0], found[1], dtype=dtype)
    return ImageDataset(images=data.images, labels=data.labels,
                        name=f"mnist-{'train' if train else 'test'}:{directory}")
