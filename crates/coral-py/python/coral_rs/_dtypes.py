"""Numpy dtypes and Coral's dtype names, both ways.

bfloat16 and the two fp8 formats have no numpy dtype of their own: they come back as
``ml_dtypes`` dtypes when that package is installed, and otherwise as ``uint16``/``uint8`` views
of the same bytes, with Coral's name of the dtype in ``WeightMetadata.dtype_name``. Storing such a
view back with that metadata keeps the dtype.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

try:  # optional
    import ml_dtypes as _ml
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    _ml = None

#: Coral's names of the dtypes numpy has itself.
NUMPY_NAMES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)

#: The dtypes numpy lacks, with the unsigned type of their width.
EXTENDED = {
    "bfloat16": np.dtype(np.uint16),
    "float8_e4m3fn": np.dtype(np.uint8),
    "float8_e5m2": np.dtype(np.uint8),
}

ALL_NAMES = NUMPY_NAMES + tuple(EXTENDED)


def has_ml_dtypes() -> bool:
    """True when bf16 and fp8 come back as ``ml_dtypes`` dtypes."""
    return _ml is not None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype Coral gives back for its dtype ``name``."""
    if name in EXTENDED:
        if _ml is not None:
            return np.dtype(getattr(_ml, name))
        return EXTENDED[name]
    return np.dtype(name)


def coral_name(dtype, hint: Optional[str] = None, what: str = "weight") -> str:
    """Coral's name of a numpy dtype; ``hint`` (a ``dtype_name`` from metadata) turns a
    ``uint16``/``uint8`` view back into bf16 or fp8. Unsupported dtypes are a ``ValueError``."""
    d = np.dtype(dtype)
    if hint in EXTENDED and d.kind == "u" and d.itemsize == EXTENDED[hint].itemsize:
        return hint
    name = d.name
    if name in ALL_NAMES and d.fields is None:
        return name
    raise ValueError(
        f"{what}: dtype {d} is not supported (Coral stores {', '.join(ALL_NAMES)})"
    )
