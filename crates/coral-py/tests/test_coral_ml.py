"""A drop-in for coral-ml 1.0.0: its objects, its keys, its files."""

import numpy as np
import pytest

from coral.core.weight_tensor import WeightMetadata as MlMeta
from coral.core.weight_tensor import WeightTensor as MlWeight
from coral.storage.hdf5_store import HDF5Store as MlStore

from coral_rs.storage import HDF5Store

from conftest import same_bytes


def ml_weight(name, shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape).astype(dtype)
    return MlWeight(data=data, metadata=MlMeta(name=name, shape=data.shape, dtype=data.dtype,
                                               layer_type="Linear", model_name="ml"))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.int8, np.uint8])
def test_coral_ml_objects_keep_their_keys(store_path, dtype):
    w = ml_weight("a", (5, 7), 1, dtype)
    with HDF5Store(store_path) as store:
        key = store.store(w)
        assert key == w.compute_hash() and len(key) == 16
        back = store.load(key)
        assert same_bytes(back.data, w.data)
        # stored again, the loaded weight finds the same key
        assert store.store(back) == key
        assert back.compute_hash() == key


def test_coral_ml_batch_and_0d(store_path):
    ws = {f"l{i}": ml_weight(f"l{i}", (3, i + 1), i) for i in range(5)}
    ws["scalar"] = MlWeight(data=np.array(3.5, np.float32),
                            metadata=MlMeta(name="scalar", shape=(), dtype=np.dtype(np.float32)))
    with HDF5Store(store_path) as store:
        keys = store.store_batch(ws)
        assert {n: ws[n].compute_hash() for n in ws} == keys
        got = store.load_batch(list(keys.values()))
        for n, k in keys.items():
            assert same_bytes(got[k].data, ws[n].data)


def test_we_read_a_store_coral_ml_wrote(tmp_path):
    path = tmp_path / "ml.h5"
    ws = [ml_weight(f"w{i}", (16, 8), i) for i in range(4)]
    ml = MlStore(str(path), compression="gzip", compression_opts=4)
    keys = [ml.store(w) for w in ws]
    ml.close()
    with HDF5Store(path, mode="r") as store:
        assert sorted(store.list_weights()) == sorted(keys)
        for w, k in zip(ws, keys):
            back = store.load(k)  # verified against coral-ml's own key
            assert same_bytes(back.data, w.data)
            assert back.metadata.name == w.metadata.name and back.metadata.layer_type == "Linear"
        info = store.get_storage_info()
        assert info["total_weights"] == 4


def test_coral_ml_reads_a_store_we_wrote(tmp_path):
    path = tmp_path / "ours.h5"
    ws = [ml_weight(f"w{i}", (16, 8), i) for i in range(3)]
    with HDF5Store(path, compression="gzip", compression_opts=4) as store:
        keys = [store.store(w) for w in ws]
    ml = MlStore(str(path), mode="r")
    try:
        assert sorted(ml.list_weights()) == sorted(keys)
        for w, k in zip(ws, keys):
            back = ml.load(k)
            assert same_bytes(back.data, w.data) and back.metadata.name == w.metadata.name
    finally:
        ml.close()
