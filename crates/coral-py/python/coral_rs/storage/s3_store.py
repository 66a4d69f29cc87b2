"""``S3Store`` and ``S3Config``: a store on any S3-compatible service (the seed's
``s3_store.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import _native
from ._native_store import NativeStore


@dataclass
class S3Config:
    """Where an S3 store lives and how it writes: the seed's fields and defaults. Without
    ``access_key``/``secret_key`` the standard AWS environment and credential files apply;
    ``endpoint_url`` names an S3-compatible service (``http://`` only when written so)."""

    bucket: str
    prefix: str = "coral/"
    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    access_key: Optional[str] = None
    secret_key: Optional[str] = None
    max_concurrency: int = 10
    compression: Optional[str] = "gzip"
    chunk_size: int = 8 * 1024 * 1024

    def __repr__(self) -> str:  # never shows the credentials
        return (
            f"S3Config(bucket={self.bucket!r}, prefix={self.prefix!r}, region={self.region!r}, "
            f"endpoint_url={self.endpoint_url!r}, access_key={'<set>' if self.access_key else None}, "
            f"secret_key={'<set>' if self.secret_key else None}, "
            f"max_concurrency={self.max_concurrency}, compression={self.compression!r}, "
            f"chunk_size={self.chunk_size})"
        )


class S3Store(NativeStore):
    """``S3Store(config)``: weights as ``.npz`` objects under the prefix (the seed's layout),
    sent and fetched ``max_concurrency`` at a time. The bucket is created when missing."""

    def __init__(self, config: S3Config):
        self.config = config
        self._compression_name = config.compression
        self._native = _native._Store.open_s3(
            config.bucket,
            config.prefix,
            config.region,
            config.endpoint_url,
            config.access_key,
            config.secret_key,
            int(config.max_concurrency),
            config.compression,
            int(config.chunk_size),
        )

    def __repr__(self) -> str:
        return f"S3Store({self.config!r})"
