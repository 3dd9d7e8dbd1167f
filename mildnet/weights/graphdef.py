"""A small reader for TensorFlow frozen GraphDef files: just enough protobuf to pull out ``Const`` tensors.

No TensorFlow and no protobuf library: the protobuf wire format is a sequence of (field number, wire type,
value) records, where the values we need are varints (ints, enums) and length-delimited bytes (strings,
sub-messages, packed arrays). Field numbers (tensorflow/core/framework/*.proto):

* ``GraphDef.node = 1`` (repeated NodeDef)
* ``NodeDef.name = 1``, ``op = 2``, ``attr = 5`` (``map<string, AttrValue>``: entries with key = 1, value = 2)
* ``AttrValue.tensor = 8`` (TensorProto)
* ``TensorProto.dtype = 1``, ``tensor_shape = 2``, ``tensor_content = 4``, ``float_val = 5`` (packed floats),
  ``int_val = 7`` (packed varints)
* ``TensorShapeProto.dim = 2``; ``Dim.size = 1``
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import MildnetError


class GraphDefError(MildnetError, ValueError):
    """The bytes are not a well-formed GraphDef (or hold a tensor we cannot read)."""


VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
DT_FLOAT, DT_INT32 = 1, 3


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise GraphDefError("varint longer than 10 bytes")


def iter_fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)`` for one message; value is an int or a memoryview slice."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == LENGTH:
            size, pos = read_varint(buf, pos)
            if pos + size > end:
                raise GraphDefError(f"field {field}: length {size} runs past the end of its message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == FIXED64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == FIXED32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:  # 3/4 are deprecated groups; 6/7 do not exist
            raise GraphDefError(f"unsupported wire type {wire} (field {field})")
        if pos > end:
            raise GraphDefError(f"field {field} runs past the end of its message")
        yield field, wire, value


def _shape(buf: memoryview) -> tuple[int, ...]:
    dims = []
    for field, _, dim in iter_fields(buf):
        if field == 2:
            size = next((v for f, _, v in iter_fields(dim) if f == 1), 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)  # int64: -1 = unknown
    return tuple(dims)


def parse_tensor(buf: memoryview) -> np.ndarray:
    """TensorProto bytes -> numpy array (float32 or int32; other dtypes raise :class:`GraphDefError`)."""
    dtype, shape, content, floats, ints = 0, (), None, [], []
    for field, wire, value in iter_fields(buf):
        if field == 1:
            dtype = value
        elif field == 2:
            shape = _shape(value)
        elif field == 4:
            content = bytes(value)
        elif field == 5:  # packed (LENGTH) or one-at-a-time (FIXED32)
            if wire == LENGTH:
                floats.extend(np.frombuffer(bytes(value), "<f4").tolist())
            else:
                floats.append(np.array([value], "<u4").view("<f4")[0])
        elif field == 7:
            if wire == LENGTH:
                pos = 0
                while pos < len(value):
                    v, pos = read_varint(value, pos)
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            else:
                ints.append(value)
    np_dtype = {DT_FLOAT: np.dtype("<f4"), DT_INT32: np.dtype("<i4")}.get(dtype)
    if np_dtype is None:
        raise GraphDefError(f"tensor dtype {dtype} is not supported (only float32 and int32)")
    if any(d < 0 for d in shape):
        raise GraphDefError(f"tensor has an unknown dimension: {shape}")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, np_dtype)
        if arr.size != count:
            raise GraphDefError(f"tensor_content holds {arr.size} values, shape {shape} needs {count}")
        return arr.reshape(shape).copy()
    vals = floats if dtype == DT_FLOAT else ints
    if not vals:
        return np.zeros(shape, np_dtype)
    if len(vals) == count:
        return np.asarray(vals, np_dtype).reshape(shape)
    if len(vals) < count:  # TF: the last value repeats to fill the shape
        return np.concatenate([np.asarray(vals, np_dtype),
                               np.full(count - len(vals), vals[-1], np_dtype)]).reshape(shape)
    raise GraphDefError(f"tensor holds {len(vals)} values, shape {shape} needs {count}")


def read_constants(data: bytes, *, prefix: str = "") -> dict[str, np.ndarray]:
    """All ``Const`` nodes of a serialized GraphDef whose name starts with ``prefix``: name -> array."""
    buf = memoryview(data)
    out: dict[str, np.ndarray] = {}
    for field, wire, node in iter_fields(buf):
        if field != 1 or wire != LENGTH:
            continue
        name = op = None
        tensor = None
        for f, w, v in iter_fields(node):
            if f == 1:
                name = bytes(v).decode("utf-8", "replace")
            elif f == 2:
                op = bytes(v).decode("utf-8", "replace")
            elif f == 5 and w == LENGTH:  # one map entry: key = 1, value (AttrValue) = 2
                key = value = None
                for ef, _, ev in iter_fields(v):
                    if ef == 1:
                        key = bytes(ev).decode("utf-8", "replace")
                    elif ef == 2:
                        value = ev
                if key == "value" and value is not None:
                    tensor = next((tv for tf_, tw, tv in iter_fields(value) if tf_ == 8 and tw == LENGTH), None)
        if op == "Const" and name is not None and name.startswith(prefix) and tensor is not None:
            try:
                out[name] = parse_tensor(tensor)
            except GraphDefError as e:
                raise GraphDefError(f"node {name}: {e}") from None
    if not out and not any(True for _ in iter_fields(buf)):
        raise GraphDefError("empty GraphDef")
    return out
