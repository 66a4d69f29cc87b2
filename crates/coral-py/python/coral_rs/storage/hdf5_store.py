"""``HDF5Store``: a local store in one HDF5 file (the seed's ``hdf5_store.py``), readable by h5py
and coral-ml; it opens coral-ml's files too."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import _native
from ._native_store import NativeStore


class HDF5Store(NativeStore):
    """``HDF5Store(filepath, compression="gzip", compression_opts=4, mode="a")``.

    ``compression``: "gzip" (levels 1-9), "lzf", "zstd" (Coral's faster codec, levels 1-22;
    h5py reads it with hdf5plugin), "coral" (Coral's float codec, the most compact on float
    weights; h5py reads it with the ``coral-h5plugin`` plugin on ``HDF5_PLUGIN_PATH``) or None. ``mode``: h5py's "r", "r+", "w", "w-"/"x", "a".
    Every load is verified against its key."""

    def __init__(
        self,
        filepath,
        compression: Optional[str] = "gzip",
        compression_opts: Optional[int] = 4,
        mode: str = "a",
    ):
        self.filepath = Path(filepath)
        self.compression = compression
        self.compression_opts = compression_opts
        self.mode = mode
        self._compression_name = compression
        if mode in ("w", "a", "w-", "x"):
            self.filepath.parent.mkdir(parents=True, exist_ok=True)
        self._native = _native._Store.open_hdf5(
            str(self.filepath), compression, compression_opts, mode
        )

    def __repr__(self) -> str:
        return (
            f"HDF5Store(filepath={str(self.filepath)!r}, compression={self.compression!r}, "
            f"mode={self.mode!r})"
        )
