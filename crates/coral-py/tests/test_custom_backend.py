"""WeightStore as a base class, as the seed's "Creating Custom Backends" shows."""

import numpy as np
import pytest

from coral_rs.storage import WeightStore

from conftest import same_bytes, weight


class DictStore(WeightStore):
    def __init__(self):
        self.d = {}
        self.closed = False

    def store(self, weight, hash_key=None):
        if hash_key is None:
            hash_key = weight.compute_hash()
        self.d[hash_key] = weight
        return hash_key

    def load(self, hash_key):
        return self.d.get(hash_key)

    def exists(self, hash_key):
        return hash_key in self.d

    def delete(self, hash_key):
        return self.d.pop(hash_key, None) is not None

    def list_weights(self):
        return list(self.d)

    def get_metadata(self, hash_key):
        w = self.d.get(hash_key)
        return None if w is None else w.metadata

    def get_storage_info(self):
        return {"total_weights": len(self.d)}

    def close(self):
        self.closed = True


def test_a_subclass_gets_batches_and_the_context_manager():
    ws = {"a": weight("a"), "b": weight("b", seed=2)}
    with DictStore() as s:
        keys = s.store_batch(ws)
        got = s.load_batch(list(keys.values()) + ["nope"])
        assert set(got) == set(keys.values())
        assert same_bytes(got[keys["a"]].data, ws["a"].data)
    assert s.closed


def test_an_incomplete_subclass_cannot_be_made():
    class Half(WeightStore):
        def store(self, weight, hash_key=None):
            return "k"

    with pytest.raises(TypeError):
        Half()
