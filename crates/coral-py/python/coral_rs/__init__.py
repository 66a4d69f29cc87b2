"""Coral from Python: neural-network weights stored by content, compressed, deduplicated and
verified, in a local HDF5 file or on S3 (see ``coral_rs.storage``).

Bytes never go through Python: hashing, compression and I/O run in Rust with the GIL released,
and arrays cross without copies.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from . import _native
from ._dtypes import has_ml_dtypes
from ._native import HDF5_VERSION, IntegrityError, __version__
from ._tensor import Delta, DeltaType, WeightMetadata, WeightTensor, encode_delta

__all__ = [
    "WeightTensor",
    "WeightMetadata",
    "Delta",
    "DeltaType",
    "IntegrityError",
    "encode_delta",
    "add",
    "export",
    "list_models",
    "has_ml_dtypes",
    "__version__",
    "HDF5_VERSION",
]


def _store(store):
    from .storage._native_store import _native_of

    return _native_of(store)


def add(store, path, name: Optional[str] = None, reference: Optional[str] = None) -> Dict[str, Any]:
    """Adds the model at ``path`` (``.safetensors``, ``.npy``, ``.npz`` or a folder) to
    ``store`` as ``name`` (default: the file's stem or the folder's name), as ``coral add``
    does: tensors the store has are reused, changed ones delta-coded against ``reference``
    (None: the closest model, chosen automatically; "none": no reference). The report."""
    return json.loads(_native.add_model(_store(store), str(path), name, reference))


def export(store, name: str, out, force: bool = False, tensors: Optional[List[str]] = None) -> int:
    """Writes the model ``name`` back to ``out`` byte for byte, every tensor verified (a
    folder model into a folder; ``force`` replaces a non-empty one; ``tensors`` picks some
    tensors only). The bytes written."""
    return _native.export_model(_store(store), name, str(out), force, list(tensors or []))


def list_models(store) -> List[str]:
    """Every model's name, sorted."""
    return _native.list_models(_store(store))
