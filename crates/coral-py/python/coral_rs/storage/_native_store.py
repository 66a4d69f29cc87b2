"""What HDF5Store and S3Store share: every method is one call into Rust, which releases the GIL
while it reads, hashes, compresses and writes."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _native
from .._tensor import (
    Delta,
    WeightMetadata,
    WeightTensor,
    delta_from,
    metadata_from,
    weight_from,
    weight_item,
    _contiguous,
)
from .weight_store import WeightStore


class NativeStore(WeightStore):
    """A store held by Coral's Rust library. Not for direct use: see HDF5Store, S3Store."""

    _native: "_native._Store"

    # -- the seed's methods -------------------------------------------------------------
    def store(self, weight, hash_key: Optional[str] = None) -> str:
        """Stores a weight (ours or coral-ml's) and returns its key: ``hash_key`` when given
        (it must be the data's hash: SHA-256, or coral-ml's xxh3-64), else Coral's SHA-256
        for a ``coral_rs.WeightTensor`` and coral-ml's xxh3-64 for a coral-ml one, as
        ``weight.compute_hash()`` gives. Storing a key that is present is a no-op."""
        return self._native.store_batch([weight_item(weight, hash_key)])[0][0]

    def store_batch(self, weights: Dict[str, Any]) -> Dict[str, str]:
        """Stores many weights at once (hashed and compressed on every core); name -> key."""
        names = list(weights)
        items = [weight_item(weights[n], None) for n in names]
        keys = self._native.store_batch(items)
        return {n: k for n, (k, _new) in zip(names, keys)}

    def load(self, hash_key: str) -> Optional[WeightTensor]:
        """Loads a weight and verifies it against its key (``IntegrityError`` when the bytes
        do not match); None when absent, or when ``hash_key`` is not a key at all. The array
        is Rust's buffer, not a copy."""
        got = self._native.load_batch([hash_key])[0]
        return None if got is None else weight_from(*got)

    def load_batch(self, hash_keys: List[str]) -> Dict[str, WeightTensor]:
        """Loads and verifies many weights; absent keys are left out."""
        keys = list(hash_keys)
        got = self._native.load_batch(keys)
        return {k: weight_from(*g) for k, g in zip(keys, got) if g is not None}

    def exists(self, hash_key: str) -> bool:
        return self._native.exists(hash_key)

    def delete(self, hash_key: str) -> bool:
        return self._native.delete(hash_key)

    def list_weights(self) -> List[str]:
        return self._native.list_weights()

    def get_metadata(self, hash_key: str) -> Optional[WeightMetadata]:
        t = self._native.get_metadata(hash_key)
        return None if t is None else metadata_from(t)

    def get_storage_info(self) -> Dict[str, Any]:
        """The seed's keys (``filepath`` for a file store, ``file_size``, ``total_weights``,
        ``total_bytes``, ``compressed_bytes``, ``compression_ratio``, ``compression``) plus
        Coral's (``backend``, ``location``, ``reclaimable_bytes``, ``codec``, ``deltas``)."""
        info = json.loads(self._native.storage_info())
        info["codec"] = info.get("compression")
        info["compression"] = self._compression_name
        if info.get("backend") == "hdf5":
            info["filepath"] = info.get("location")
        return info

    def close(self) -> None:
        """Flushes and closes; later calls raise ValueError. Closing twice does nothing."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    # -- deltas -------------------------------------------------------------------------
    def store_delta(self, delta: Delta, delta_hash: str) -> str:
        """Stores a delta under the key of the weight it encodes."""
        data = _contiguous(np.asarray(delta.data)).view(np.uint8).reshape(-1)
        kind = getattr(delta.delta_type, "value", delta.delta_type)
        return self._native.store_delta(
            str(kind),
            data,
            data.__array_interface__["data"][0],
            int(data.nbytes),
            json.dumps(delta.metadata or {}),
            [int(d) for d in delta.original_shape],
            _dtype_name(delta.original_dtype),
            delta.reference_hash,
            float(delta.compression_ratio),
            delta_hash,
        )

    def load_delta(self, delta_hash: str) -> Optional[Delta]:
        t = self._native.load_delta(delta_hash)
        return None if t is None else delta_from(t)

    def delta_exists(self, delta_hash: str) -> bool:
        return self._native.delta_exists(delta_hash)

    def delete_delta(self, delta_hash: str) -> bool:
        return self._native.delete_delta(delta_hash)

    def list_deltas(self) -> List[str]:
        return self._native.list_deltas()

    def get_delta_storage_info(self) -> Dict[str, Any]:
        return json.loads(self._native.delta_storage_info())

    # -- sync ---------------------------------------------------------------------------
    def sync_from_local(self, local_store: "NativeStore") -> Dict[str, Any]:
        """Uploads what ``local_store`` has and this store lacks (weights, deltas with their
        references, models); the seed's stats: ``uploaded``, ``skipped``,
        ``bytes_transferred`` (plus ``details`` per kind)."""
        return json.loads(self._native.sync_from_local(_native_of(local_store)))

    def sync_to_local(self, local_store: "NativeStore") -> Dict[str, Any]:
        """Downloads what this store has and ``local_store`` lacks; ``downloaded``,
        ``skipped``, ``bytes_transferred``, ``details``."""
        return json.loads(self._native.sync_to_local(_native_of(local_store)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._native.location!r})"


def _dtype_name(dtype) -> str:
    from .._dtypes import coral_name

    if isinstance(dtype, str) and dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return dtype
    return coral_name(dtype, None, "delta")


def _native_of(store) -> "_native._Store":
    n = getattr(store, "_native", None)
    if not isinstance(n, _native._Store):
        raise ValueError(
            f"sync needs a coral_rs store (HDF5Store or S3Store), got {type(store).__name__}"
        )
    return n
