"""The abstract interface every store keeps (the seed's ``weight_store.py``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional

from .._tensor import WeightMetadata, WeightTensor


class WeightStore(ABC):
    """Base class of weight stores: subclass it and implement the abstract methods, as the
    seed's "Creating Custom Backends" shows. ``store_batch`` and ``load_batch`` have default
    implementations (one weight at a time); the context manager closes the store."""

    @abstractmethod
    def store(self, weight: WeightTensor, hash_key: Optional[str] = None) -> str:
        """Stores a weight; returns its key."""

    @abstractmethod
    def load(self, hash_key: str) -> Optional[WeightTensor]:
        """Loads a weight; None when absent."""

    @abstractmethod
    def exists(self, hash_key: str) -> bool:
        """True when the key is present."""

    @abstractmethod
    def delete(self, hash_key: str) -> bool:
        """Deletes a weight; False when absent."""

    @abstractmethod
    def list_weights(self) -> List[str]:
        """Every key."""

    @abstractmethod
    def get_metadata(self, hash_key: str) -> Optional[WeightMetadata]:
        """The metadata without the data; None when absent."""

    def store_batch(self, weights: Dict[str, WeightTensor]) -> Dict[str, str]:
        """Stores many weights; returns name -> key."""
        return {name: self.store(w) for name, w in weights.items()}

    def load_batch(self, hash_keys: List[str]) -> Dict[str, WeightTensor]:
        """Loads many weights; absent keys are left out."""
        out = {}
        for k in hash_keys:
            w = self.load(k)
            if w is not None:
                out[k] = w
        return out

    @abstractmethod
    def get_storage_info(self) -> Dict[str, Any]:
        """The store's figures."""

    @abstractmethod
    def close(self) -> None:
        """Releases the store."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()
        return False
