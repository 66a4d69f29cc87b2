"""``WeightTensor``, ``WeightMetadata`` and ``Delta``: the seed's objects, with numpy arrays."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _dtypes, _native


@dataclass
class WeightMetadata:
    """What is known of a weight besides its bytes (the seed's ``WeightMetadata``).

    ``dtype_name`` is Coral's name of the dtype ("bfloat16"); it matters when ``dtype`` is a
    ``uint16``/``uint8`` view of bf16 or fp8 (see ``coral_rs._dtypes``)."""

    name: str
    shape: Tuple[int, ...]
    dtype: Any
    layer_type: Optional[str] = None
    model_name: Optional[str] = None
    compression_info: Dict[str, Any] = field(default_factory=dict)
    hash: Optional[str] = None
    dtype_name: Optional[str] = None


class WeightTensor:
    """A weight: a numpy array and its metadata (the seed's ``WeightTensor``).

    Keys are Coral's SHA-256 (``compute_hash``); coral-ml's own ``WeightTensor`` objects, which
    every store also takes, keep coral-ml's xxh3-64 keys."""

    def __init__(
        self,
        data: Optional[np.ndarray] = None,
        metadata: Optional[WeightMetadata] = None,
        store_ref: Optional[str] = None,
    ):
        self._data = data
        self._metadata = metadata
        self._store_ref = store_ref
        self._hash: Optional[str] = None
        # Keyed as coral-ml keys (xxh3-64): set for weights loaded under such a key, so that
        # storing them again finds the same key.
        self._legacy = False
        if data is not None and metadata is None:
            data = np.asarray(data)
            self._data = data
            self._metadata = WeightMetadata(
                name="unnamed", shape=tuple(data.shape), dtype=data.dtype
            )

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            raise ValueError("weight data not loaded")
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        value = np.asarray(value)
        self._data = value
        self._hash = None
        if self._metadata is not None:
            self._metadata.shape = tuple(value.shape)
            self._metadata.dtype = value.dtype

    @property
    def metadata(self) -> WeightMetadata:
        if self._metadata is None:
            raise ValueError("no metadata for this weight")
        return self._metadata

    @property
    def store_ref(self) -> Optional[str]:
        return self._store_ref

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.metadata.shape)

    @property
    def dtype(self):
        return self.metadata.dtype

    @property
    def dtype_name(self) -> str:
        """Coral's name of the dtype ("bfloat16", "float32", ...)."""
        return _dtypes.coral_name(
            self.data.dtype, self.metadata.dtype_name, repr(self.metadata.name)
        )

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def compute_hash(self, force: bool = False) -> str:
        """Coral's key of this weight: SHA-256 over dtype, shape and bytes, computed in Rust."""
        if self._hash is not None and not force:
            return self._hash
        item = weight_item(self, None, legacy=self._legacy)
        self._hash = _native.hash_array(item)
        if self._metadata is not None:
            self._metadata.hash = self._hash
        return self._hash

    def __repr__(self) -> str:
        m = self._metadata
        return (
            f"WeightTensor(name={m.name if m else None!r}, shape={self.shape if m else None}, "
            f"dtype={m.dtype if m else None})"
        )


class DeltaType(str, enum.Enum):
    """The nine delta strategies, with the seed's names (see ``docs/format.md``)."""

    FLOAT32_RAW = "float32_raw"
    COMPRESSED = "compressed"
    XOR_FLOAT32 = "xor_float32"
    XOR_BFLOAT16 = "xor_bfloat16"
    EXPONENT_MANTISSA = "exponent_mantissa"
    INT8_QUANTIZED = "int8_quantized"
    INT16_QUANTIZED = "int16_quantized"
    SPARSE = "sparse"
    PER_AXIS_SCALED = "per_axis_scaled"


@dataclass
class Delta:
    """A weight as the difference from a reference weight (the seed's ``Delta``). ``data`` is
    the payload, as ``uint8``, in the layout ``docs/format.md`` gives for its type."""

    delta_type: DeltaType
    data: np.ndarray
    metadata: Dict[str, Any]
    original_shape: Tuple[int, ...]
    original_dtype: Any
    reference_hash: str
    compression_ratio: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.data).nbytes)


def _contiguous(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def weight_item(weight, hash_key: Optional[str], legacy: Optional[bool] = None):
    """The tuple ``_native`` takes for a weight: ours or coral-ml's (duck-typed on ``.data``
    and ``.metadata``). The array is passed by address, not copied, when it is C-contiguous."""
    try:
        data = weight.data
        meta = weight.metadata
    except AttributeError:
        raise ValueError(
            f"expected a WeightTensor (an object with .data and .metadata), got {type(weight).__name__}"
        ) from None
    name = getattr(meta, "name", None)
    if not isinstance(name, str):
        raise ValueError(f"weight metadata needs a str name, got {name!r}")
    if not isinstance(data, np.ndarray):
        data = np.asarray(data)
    what = f"weight {name!r}"
    dtype_name = _dtypes.coral_name(data.dtype, getattr(meta, "dtype_name", None), what)
    shape = tuple(int(d) for d in data.shape)
    meta_shape = getattr(meta, "shape", None)
    if meta_shape is not None and tuple(int(d) for d in meta_shape) != shape:
        raise ValueError(
            f"{what}: metadata shape {tuple(meta_shape)} does not match the data's {shape}"
        )
    arr = _contiguous(data)
    info = getattr(meta, "compression_info", None) or {}
    try:
        info_json = json.dumps(info)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: compression_info is not JSON: {e}") from None
    if legacy is None:
        legacy = not isinstance(weight, WeightTensor) or weight._legacy
    return (
        name,
        dtype_name,
        shape,
        arr,
        arr.__array_interface__["data"][0],
        int(arr.nbytes),
        getattr(meta, "layer_type", None),
        getattr(meta, "model_name", None),
        info_json,
        hash_key,
        bool(legacy),
    )


def array_from(buf, dtype_name: str, shape) -> np.ndarray:
    """A numpy array over Rust's bytes (no copy): ``buf`` stays its base."""
    raw = np.asarray(buf)
    return raw.view(_dtypes.numpy_dtype(dtype_name)).reshape(tuple(shape))


def metadata_from(t) -> WeightMetadata:
    name, shape, dtype_name, layer_type, model_name, info, key = t
    return WeightMetadata(
        name=name,
        shape=tuple(shape),
        dtype=_dtypes.numpy_dtype(dtype_name),
        layer_type=layer_type,
        model_name=model_name,
        compression_info=json.loads(info) if info else {},
        hash=key,
        dtype_name=dtype_name,
    )


def weight_from(meta_t, buf) -> WeightTensor:
    meta = metadata_from(meta_t)
    data = array_from(buf, meta.dtype_name, meta.shape)
    w = WeightTensor(data=data, metadata=meta, store_ref=meta.hash)
    if meta.hash is not None:
        w._hash = meta.hash
        w._legacy = len(meta.hash) == 16
    return w


def delta_from(t) -> Delta:
    delta_type, buf, metadata, shape, dtype_name, reference, ratio = t
    return Delta(
        delta_type=DeltaType(delta_type),
        data=np.asarray(buf),
        metadata=json.loads(metadata) if metadata else {},
        original_shape=tuple(shape),
        original_dtype=_dtypes.numpy_dtype(dtype_name),
        reference_hash=reference,
        compression_ratio=float(ratio),
    )


def encode_delta(target, reference, delta_type=None, reference_hash: Optional[str] = None):
    """``target`` as a ``Delta`` against ``reference``: with the strategy named (a
    ``DeltaType`` or its value), or, by default, the smallest lossless one; None when no delta
    is smaller than the weight compressed. ``reference_hash`` is the reference's key in the
    store (by default its ``compute_hash()``)."""
    if reference_hash is None:
        reference_hash = reference.compute_hash()
    kind = None if delta_type is None else DeltaType(getattr(delta_type, "value", delta_type)).value
    t = _native.encode_delta(
        weight_item(target, None),
        weight_item(reference, None),
        reference_hash,
        kind,
    )
    return None if t is None else delta_from(t)
