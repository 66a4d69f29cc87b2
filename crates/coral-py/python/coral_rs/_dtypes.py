"""Numpy dtypes and Coral's dtype names, both ways.

bfloat16 and the two fp8 formats have no numpy dtype of their own: they come back as
``ml_dtypes`` dtypes when that package is installed, and otherwise as ``uint16``/``uint8`` views
of the same bytes, with Coral's name of the dtype in ``WeightMetadata.dtype_name``. Storing such a
view back with that metadata keeps the dtype.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# ml_dtypes is imported on first need, not with coral_rs: importing it takes about a second
# (it registers its casts and ufunc loops with numpy), which a script that never meets bf16 or
# fp8 should not pay.
_ML_UNSET = object()
_ml_module = _ML_UNSET


def _ml():
    """The ml_dtypes module, or None when it is not installed."""
    global _ml_module
    if _ml_module is _ML_UNSET:
        try:
            import ml_dtypes
        except ImportError:  # exercised in a subprocess by the tests
            ml_dtypes = None
        _ml_module = ml_dtypes
    return _ml_module

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
    return _ml() is not None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype Coral gives back for its dtype ``name``."""
    if name in EXTENDED:
        ml = _ml()
        if ml is not None:
            return np.dtype(getattr(ml, name))
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
