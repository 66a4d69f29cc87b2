"""Every method of HDF5Store, every dtype, zero-copy both ways."""

import json

import h5py
import numpy as np
import pytest

import coral_rs
from coral_rs import WeightMetadata, WeightTensor, _native
from coral_rs._tensor import weight_item
from coral_rs.storage import HDF5Store, WeightStore

from conftest import same_bytes, weight


def test_store_load_round_trip(store_path):
    w = weight("enc.layer.0.weight", layer_type="Linear", model_name="m",
               compression_info={"note": "x"})
    with HDF5Store(store_path) as store:
        assert isinstance(store, WeightStore)
        key = store.store(w)
        assert key == w.compute_hash() and len(key) == 64
        assert store.store(w) == key  # a no-op
        assert store.exists(key)
        back = store.load(key)
        assert same_bytes(back.data, w.data) and back.data.dtype == np.float32
        m = back.metadata
        assert (m.name, m.shape, m.layer_type, m.model_name) == ("enc.layer.0.weight", (4, 5), "Linear", "m")
        assert m.compression_info == {"note": "x"} and m.hash == key and m.dtype_name == "float32"
        assert store.get_metadata(key) == m
        assert store.list_weights() == [key]
        assert store.delete(key) and not store.exists(key) and not store.delete(key)
        assert store.list_weights() == []


def test_absent_and_invalid_keys_are_none(store_path):
    with HDF5Store(store_path) as store:
        assert store.load("not-a-key") is None
        assert store.load("0" * 64) is None
        assert store.get_metadata("not-a-key") is None
        assert not store.exists("zz") and not store.delete("zz")
        assert store.load_batch(["not-a-key", "0" * 64]) == {}


def test_batches(store_path):
    ws = {f"t{i}": weight(f"t{i}", shape=(8, 3 + i), seed=i) for i in range(12)}
    with HDF5Store(store_path) as store:
        keys = store.store_batch(ws)
        assert list(keys) == list(ws)
        assert all(keys[n] == ws[n].compute_hash() for n in ws)
        got = store.load_batch(list(keys.values()) + ["f" * 64])
        assert set(got) == set(keys.values())
        for n, k in keys.items():
            assert same_bytes(got[k].data, ws[n].data)
            assert got[k].metadata.name == n


def test_storage_info_has_the_seeds_keys(store_path):
    with HDF5Store(store_path, compression="gzip", compression_opts=4) as store:
        store.store_batch({"a": weight("a", shape=(256, 64)), "b": weight("b", seed=3)})
        info = store.get_storage_info()
    for k in ("filepath", "file_size", "total_weights", "total_bytes", "compressed_bytes",
              "compression_ratio", "compression"):
        assert k in info, k
    assert info["total_weights"] == 2 and info["compression"] == "gzip"
    assert info["total_bytes"] == 256 * 64 * 4 + 20 * 4
    assert 0 < info["compression_ratio"] < 1 and info["codec"].startswith("gzip-4")
    assert info["filepath"] == str(store_path) and info["backend"] == "hdf5"


@pytest.mark.parametrize("compression,opts", [("gzip", 1), ("gzip", 9), ("lzf", None), ("zstd", 3), (None, None)])
def test_compressions_read_by_h5py(store_path, compression, opts):
    w = weight(shape=(64, 32))
    with HDF5Store(store_path, compression=compression, compression_opts=opts) as store:
        key = store.store(w)
        assert same_bytes(store.load(key).data, w.data)
    if compression == "zstd":
        import hdf5plugin  # noqa: F401  (registers zstd for h5py)
    with h5py.File(store_path, "r") as f:
        assert same_bytes(np.asarray(f["weights"][key]).view(np.float32).reshape(64, 32), w.data)


DTYPES = ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
          "float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


def raw_of(name, n, seed=0):
    """n elements of dtype `name` with every byte pattern likely, as the numpy dtype Coral
    gives back."""
    d = coral_rs._dtypes.numpy_dtype(name)
    rng = np.random.default_rng(seed)
    if name == "bool":
        return rng.integers(0, 2, n).astype(bool)
    return np.frombuffer(rng.bytes(n * d.itemsize), dtype=d).copy()


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 0, 2), (5, 6)])
def test_every_dtype_round_trips(store_path, name, shape):
    n = int(np.prod(shape, dtype=np.int64))
    data = raw_of(name, n).reshape(shape)
    w = WeightTensor(data, WeightMetadata(name="x", shape=shape, dtype=data.dtype, dtype_name=name))
    with HDF5Store(store_path) as store:
        key = store.store(w)
        back = store.load(key)
    assert back.metadata.dtype_name == name
    assert back.data.dtype == coral_rs._dtypes.numpy_dtype(name)
    assert same_bytes(back.data, data)


@pytest.mark.parametrize("name", DTYPES)
def test_the_float_codec_round_trips_every_dtype(store_path, name):
    # compression="coral": Coral's float codec for float32/bfloat16/float16, zstd for the rest.
    data = raw_of(name, 3000).reshape(100, 30)
    w = WeightTensor(data, WeightMetadata(name="x", shape=(100, 30), dtype=data.dtype, dtype_name=name))
    with HDF5Store(store_path, compression="coral") as store:
        key = store.store(w)
        back = store.load(key)
        assert "coral" in store.get_storage_info()["compression"]
    assert same_bytes(back.data, data)


def test_bf16_and_fp8_are_ml_dtypes():
    import ml_dtypes

    assert coral_rs.has_ml_dtypes()
    assert coral_rs._dtypes.numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert coral_rs._dtypes.numpy_dtype("float8_e4m3fn") == np.dtype(ml_dtypes.float8_e4m3fn)


def test_special_values_bit_for_bit(store_path):
    bits = np.array([0x7FC00000, 0x7FC00001, 0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x80000000,
                     0x00000001, 0x007FFFFF], dtype=np.uint32)
    w = WeightTensor(bits.view(np.float32), WeightMetadata(name="nan", shape=(8,), dtype=np.float32))
    with HDF5Store(store_path) as store:
        back = store.load(store.store(w))
    assert back.data.view(np.uint32).tolist() == bits.tolist()


def test_load_is_zero_copy_and_writable(store_path):
    w = weight(shape=(300, 200))
    with HDF5Store(store_path) as store:
        back = store.load(store.store(w))
    base = back.data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, _native.Buffer), type(base)
    assert len(base) == w.data.nbytes
    # Rust handed over bytes nothing else shares: numpy may write to them.
    assert back.data.flags.writeable
    back.data[0, 0] = 1.5
    assert back.data[0, 0] == 1.5


def test_store_reads_contiguous_arrays_in_place():
    w = weight(shape=(10, 10))
    item = weight_item(w, None)
    assert item[3] is w.data  # passed by address, not copied
    assert item[4] == w.data.__array_interface__["data"][0]
    t = WeightTensor(w.data.T, WeightMetadata(name="t", shape=(10, 10), dtype=np.float32))
    item = weight_item(t, None)
    assert item[3] is not t.data and item[3].flags.c_contiguous  # copied once, C order


def test_non_contiguous_and_big_endian_arrays(store_path):
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    views = {
        "transposed": base.T,
        "strided": base[::2, ::3],
        "big_endian": base.astype(">f4"),
        "fortran": np.asfortranarray(base),
    }
    with HDF5Store(store_path) as store:
        for name, arr in views.items():
            w = WeightTensor(arr, WeightMetadata(name=name, shape=arr.shape, dtype=arr.dtype))
            back = store.load(store.store(w))
            assert np.array_equal(back.data, arr) and back.data.dtype == np.float32, name


def test_the_same_weight_from_another_layout_has_the_same_key(store_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    k1 = WeightTensor(a, WeightMetadata("a", (3, 4), a.dtype)).compute_hash()
    f = np.asfortranarray(a)
    k2 = WeightTensor(f, WeightMetadata("a", (3, 4), f.dtype)).compute_hash()
    assert k1 == k2


def test_modes(store_path):
    w = weight()
    with HDF5Store(store_path, mode="w") as store:
        key = store.store(w)
    with HDF5Store(store_path, mode="r") as store:
        assert same_bytes(store.load(key).data, w.data)
        with pytest.raises(OSError, match="read-only"):
            store.store(weight(seed=9))
    with HDF5Store(store_path, mode="a") as store:
        assert store.exists(key)
    with HDF5Store(store_path, mode="w") as store:
        assert store.list_weights() == []
    with pytest.raises(OSError):
        HDF5Store(store_path, mode="w-")


def test_repr_and_closed(store_path):
    store = HDF5Store(store_path)
    assert "HDF5Store" in repr(store) and not store.closed
    store.close()
    store.close()  # twice is fine
    assert store.closed


def test_weight_tensor_api():
    w = weight(shape=(2, 3))
    assert w.shape == (2, 3) and w.size == 6 and w.nbytes == 24 and w.dtype == np.float32
    assert w.dtype_name == "float32"
    h = w.compute_hash()
    assert w.metadata.hash == h
    w.data = np.zeros((3, 2), dtype=np.float32)
    assert w.shape == (3, 2) and w.compute_hash() != h
    assert WeightTensor(np.ones(3)).metadata.name == "unnamed"
    assert "WeightTensor" in repr(w)
    assert json.dumps(w.metadata.compression_info) == "{}"


def test_freed_arrays_are_reused_and_never_leak_into_the_next_load(store_path):
    """A large array numpy frees goes back to Coral's pool; the next load decodes into it: its
    old bytes (scribbled over here) must never show through, in the chunks or past them."""
    a = weight("a", shape=(1500, 1000), seed=1)   # 6 MB: pooled
    b = weight("b", shape=(1400, 1000), seed=2)   # fits into a's buffer
    z = WeightTensor(np.zeros((1450, 1000), np.float32), WeightMetadata("z", (1450, 1000), np.float32))
    with HDF5Store(store_path) as store:
        keys = store.store_batch({"a": a, "b": b, "z": z})
        for _ in range(3):
            for name, w in (("a", a), ("b", b), ("z", z)):
                back = store.load(keys[name])
                assert same_bytes(back.data, w.data), name
                back.data[...] = np.float32(np.nan)  # scribble before it is freed
                del back
