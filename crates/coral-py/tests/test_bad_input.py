"""Bad input: one clear exception, and the store as it was."""

import numpy as np
import pytest

import coral_rs
from coral_rs import IntegrityError, WeightMetadata, WeightTensor
from coral_rs.storage import HDF5Store

from conftest import same_bytes, weight


@pytest.mark.parametrize("data", [
    np.zeros(3, dtype=np.complex64),
    np.array(["a", "b"]),
    np.array([object(), 1], dtype=object),
    np.zeros(2, dtype="datetime64[s]"),
    np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
])
def test_unsupported_dtypes_are_value_errors(store_path, data):
    w = WeightTensor(data, WeightMetadata(name="bad", shape=data.shape, dtype=data.dtype))
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError, match="'bad'.*not supported"):
            store.store(w)
        assert store.list_weights() == []


def test_not_a_weight(store_path):
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError, match="expected a WeightTensor"):
            store.store(np.zeros(3))
        with pytest.raises(ValueError, match="expected a WeightTensor"):
            store.store_batch({"x": "not a weight"})


def test_shape_mismatch(store_path):
    w = WeightTensor(np.zeros((2, 3), np.float32), WeightMetadata(name="m", shape=(3, 2), dtype=np.float32))
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError, match="'m'.*shape"):
            store.store(w)


def test_wrong_and_malformed_hash_keys(store_path):
    w = weight()
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError, match="is not the hash"):
            store.store(w, hash_key="0" * 64)
        with pytest.raises(ValueError, match="not a Coral key"):
            store.store(w, hash_key="my-own-key")
        assert store.list_weights() == []
        # the right key, given, is fine
        assert store.store(w, hash_key=w.compute_hash()) == w.compute_hash()


def test_a_failed_batch_stores_nothing(store_path):
    good = weight("good")
    bad = WeightTensor(np.zeros(2, np.complex64), WeightMetadata("bad", (2,), np.complex64))
    with HDF5Store(store_path) as store:
        with pytest.raises(ValueError):
            store.store_batch({"good": good, "bad": bad})
        assert store.list_weights() == []


def test_closed_store(store_path):
    store = HDF5Store(store_path)
    key = store.store(weight())
    store.close()
    for call in (lambda: store.load(key), lambda: store.store(weight()), lambda: store.exists(key),
                 lambda: store.list_weights(), lambda: store.get_storage_info(),
                 lambda: store.load_batch([key]), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_bad_options(store_path, tmp_path):
    with pytest.raises(ValueError, match="compression"):
        HDF5Store(store_path, compression="brotli")
    with pytest.raises(ValueError, match="mode"):
        HDF5Store(store_path, mode="q")
    with pytest.raises(ValueError):
        HDF5Store(store_path, compression="gzip", compression_opts=12)
    with pytest.raises(OSError, match="no-such"):
        HDF5Store(tmp_path / "no-such.h5", mode="r")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5" * 100)
    with pytest.raises(OSError, match="junk.h5"):
        HDF5Store(junk, mode="r")
    assert junk.read_bytes() == b"this is not HDF5" * 100


def test_damaged_bytes_are_an_integrity_error(store_path):
    import h5py

    w = weight(shape=(64, 64))
    with HDF5Store(store_path) as store:
        key = store.store(w)
    # Another program rewrites the dataset with other values (valid HDF5, wrong content).
    with h5py.File(store_path, "r+") as f:
        ds = f["weights"][key]
        raw = np.asarray(ds)
        raw.view(np.uint8).reshape(-1)[100] ^= 0x40
        ds[...] = raw
    with HDF5Store(store_path, mode="r") as store:
        with pytest.raises(IntegrityError, match=key) as e:
            store.load(key)
        assert isinstance(e.value, ValueError)
        with pytest.raises(IntegrityError):
            store.load_batch([key])
        assert store.get_metadata(key).name == "w"  # metadata is still readable
