"""Model files and out-of-core encoding: what a user ships and how new data meet it.

* :func:`save` / :func:`load` / :func:`read_info` (:mod:`deqppl.io.model_file`): a fitted
  encoder and its model in one versioned, checksummed safetensors file (tensors and JSON, never
  pickled code). Classes take part through the saved-model protocol of
  :mod:`deqppl.io.registry` (:func:`register`).
* :func:`encode` (:mod:`deqppl.io.stream`): amortised encoding of a Parquet/CSV table larger than
  memory, chunk by chunk, resumable (``deqppl encode`` on the command line).

pyarrow is imported only when data are streamed.
"""

from .model_file import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    ModelFileInfo,
    default_columns,
    digest,
    load,
    read_info,
    save,
)
from .stream import DEFAULT_CHUNK_ROWS, EncodeResult, EncodeStatus, encode
from .registry import lookup, name_of, register, register_settings, registered, settings_config, settings_from_config

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "EncodeResult",
    "EncodeStatus",
    "encode",
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "ModelFileInfo",
    "default_columns",
    "digest",
    "load",
    "lookup",
    "name_of",
    "read_info",
    "register",
    "register_settings",
    "registered",
    "save",
    "settings_config",
    "settings_from_config",
]
