"""Context files: a processed prompt's cache state on disk, bound to the model that wrote it.

Layout (format version 2):

    b"HYBRIDCTX\\n"  |  header length (u64, little-endian)  |  header (JSON)  |  payload

The header names the format version, the model (a hash of its configuration and dtype), its
weights (`weights_digest`), the number of tokens, the payload's size and SHA-256. The payload is
the raw bytes of a fixed list of arrays, one after the other: the prompt (int64), the logits of its
last token (float32), then for every layer the bytes of each part of its state, in the order and
with the shapes that the reading engine itself expects for that many tokens
(`PagedKVCache.snapshot_layout`).

So a reader checks everything before it allocates: the magic, the header's size and fields, the
model and weights, the length against its own limit, and the payload size against what its own
layout needs. Only then does it allocate the arrays and read the payload straight into them,
hashing as it goes; the checksum is compared before anything reaches the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

MAGIC = b"HYBRIDCTX\n"
FORMAT_VERSION = 2
MAX_HEADER_BYTES = 1 << 16  # the header is a few hundred bytes; more means a corrupted length


class ContextFileError(ValueError):
    """A context file that cannot be used: corrupted, truncated, another model, another format."""


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of `model.state_dict()` (name, dtype, shape and bytes), in name
    order. About 0.56 s per GB of weights on a 2-core EPYC (0.27 s for the "small" model's 118M fp32
    parameters, 474 MB); `Engine` computes it once, and again only after the weights change."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a tensor of the state dict is replaced or modified in place (its autograd
    version counter moves on every in-place write, `load_state_dict` and optimizer steps included)."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model.state_dict().items())


def payload_nbytes(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    return sum(_nbytes(dtype, shape) for _, dtype, shape in layout)


def write(path: str | Path, header: dict, arrays: list[torch.Tensor]) -> int:
    """Write header + arrays to `path` atomically (a temporary file renamed into place, so a
    failed write never leaves a partial file); returns the file's size."""
    path = Path(path)
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(_bytes(array))
    header = {**header, "format_version": FORMAT_VERSION,
              "payload_bytes": sum(a.nbytes for a in arrays), "sha256": digest.hexdigest()}
    head = json.dumps(header).encode()
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with temporary.open("wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head)
            for array in arrays:
                f.write(_bytes(array))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return len(MAGIC) + 8 + len(head) + header["payload_bytes"]


def read_header(f, path: Path) -> tuple[dict, int]:
    """The header of an open file, checked for shape (not yet against a model); returns it and the
    payload's offset."""
    size = os.fstat(f.fileno()).st_size
    if f.read(len(MAGIC)) != MAGIC:
        raise ContextFileError(f"{path} is not a hybrid-attention context file")
    raw = f.read(8)
    if len(raw) < 8:
        raise ContextFileError(f"{path} is truncated: it ends inside the header")
    (head_len,) = struct.unpack("<Q", raw)
    offset = len(MAGIC) + 8 + head_len
    if head_len > MAX_HEADER_BYTES:
        raise ContextFileError(f"{path}: the header is corrupted (it claims {head_len:,} bytes)")
    if offset > size:
        raise ContextFileError(f"{path} is truncated: it ends inside the header")
    try:
        header = json.loads(f.read(head_len))
    except (ValueError, UnicodeDecodeError):
        raise ContextFileError(f"{path}: the header is corrupted") from None
    if not isinstance(header, dict):
        raise ContextFileError(f"{path}: the header is corrupted (not a JSON object)")
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise ContextFileError(f"{path}: the header is corrupted (format version {version!r})")
    if version > FORMAT_VERSION:
        raise ContextFileError(f"{path} has format version {version}; this library reads up to "
                               f"{FORMAT_VERSION} (upgrade hybrid-attention)")
    if version < FORMAT_VERSION:
        raise ContextFileError(f"{path} has format version {version}, which did not bind the file to "
                               f"the model's weights; save the context again")
    for key, check in (("model", _is_hex64), ("weights", _is_hex64), ("sha256", _is_hex64),
                       ("tokens", _is_int), ("payload_bytes", _is_int)):
        if not check(header.get(key)):
            raise ContextFileError(f"{path}: the header is corrupted ({key!r} is {header.get(key)!r})")
    return header, offset


def read_payload(f, path: Path, header: dict, offset: int,
                 layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Read the payload into freshly allocated arrays of `layout` (name, dtype, shape), checking
    its size first and its checksum after; returns {name: array}."""
    expected = payload_nbytes(layout)
    if header["payload_bytes"] != expected:
        raise ContextFileError(f"{path} holds {header['payload_bytes']:,} payload bytes, this model's "
                               f"state for {header['tokens']} tokens takes {expected:,}")
    available = os.fstat(f.fileno()).st_size - offset
    if available < expected:
        raise ContextFileError(f"{path} is truncated: {available:,} of {expected:,} payload bytes")
    if available > expected:
        raise ContextFileError(f"{path} is corrupted: {available - expected:,} bytes after the payload")
    f.seek(offset)
    digest = hashlib.sha256()
    arrays = {}
    for name, dtype, shape in layout:
        array = torch.empty(shape, dtype=dtype)
        view = _bytes(array)
        if f.readinto(view) != len(view):
            raise ContextFileError(f"{path} is truncated inside {name!r}")
        digest.update(view)
        arrays[name] = array
    if digest.hexdigest() != header["sha256"]:
        raise ContextFileError(f"{path} is corrupted: the checksum does not match")
    return arrays


def _bytes(array: torch.Tensor) -> memoryview:
    return memoryview(array.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty(0, dtype=dtype).element_size()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex64(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
