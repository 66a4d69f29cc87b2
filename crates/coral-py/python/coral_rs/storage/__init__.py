"""Coral's stores, with the seed's names: ``WeightStore`` (subclass it for your own backend),
``HDF5Store``, ``S3Config`` and ``S3Store``."""

from .hdf5_store import HDF5Store
from .s3_store import S3Config, S3Store
from .weight_store import WeightStore

__all__ = ["WeightStore", "HDF5Store", "S3Config", "S3Store"]
