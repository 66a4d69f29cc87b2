"""The seed's delta methods."""

import numpy as np
import pytest

import coral_rs
from coral_rs import DeltaType, WeightMetadata, WeightTensor
from coral_rs.storage import HDF5Store

from conftest import same_bytes


def pair(dtype=np.float32):
    rng = np.random.default_rng(5)
    base = (rng.standard_normal((64, 64)) * 0.02).astype(dtype)
    tuned = base.copy()
    tuned.reshape(-1)[::97] += dtype(1e-3)
    meta = lambda n: WeightMetadata(name=n, shape=base.shape, dtype=base.dtype)  # noqa: E731
    return WeightTensor(base, meta("w")), WeightTensor(tuned, meta("w"))


@pytest.mark.parametrize("kind", [None, DeltaType.XOR_FLOAT32, "float32_raw", DeltaType.SPARSE])
def test_store_and_load_deltas(store_path, kind):
    ref, target = pair()
    with HDF5Store(store_path) as store:
        rk = store.store(ref)
        tk = target.compute_hash()
        delta = coral_rs.encode_delta(target, ref, kind)
        assert delta is not None and delta.reference_hash == rk
        assert store.store_delta(delta, tk) == tk
        assert store.delta_exists(tk) and store.exists(tk)
        assert store.list_deltas() == [tk]
        back = store.load_delta(tk)
        assert back.delta_type == delta.delta_type and same_bytes(back.data, delta.data)
        assert back.original_shape == (64, 64) and back.reference_hash == rk
        info = store.get_delta_storage_info()
        assert info["total_deltas"] == 1 and info["by_type"] == {delta.delta_type.value: 1}
        if delta.delta_type != DeltaType.SPARSE:
            # the weight, rebuilt from its reference and verified
            assert same_bytes(store.load(tk).data, target.data)
        assert store.delete_delta(tk) and not store.delta_exists(tk) and not store.delete_delta(tk)


def test_delta_errors(store_path):
    ref, target = pair()
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError):
            coral_rs.encode_delta(target, ref, "no_such_strategy")
        assert store.load_delta("nope") is None and not store.delta_exists("nope")
