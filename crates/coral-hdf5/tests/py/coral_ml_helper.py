"""Drives coral-ml 1.0.0's HDF5Store and h5py for coral-hdf5's interop tests and benchmark.

Usage: python coral_ml_helper.py <command> [args...]; every command prints one JSON object.

  ingest  MODEL DTYPE OUT.h5 COMPRESSION    time store_batch of the model (fp32 or bf16)
  load    STORE.h5                           time load_batch of every key
  write   MODEL OUT.h5                       write the model with coral-ml's defaults
  verify  STORE.h5                           open with coral-ml, load every weight, re-hash
  dump    STORE.h5                           h5py (+hdf5plugin): attrs and sha256 of each dataset
"""

import hashlib
import json
import os
import resource
import struct
import sys
import time

import numpy as np

DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16,
}


def read_safetensors(path):
    """The tensors of a safetensors file as (name, array), in header order."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            raw = f.read(end - begin)
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
            out.append((name, arr))
        return out


def to_bf16_bits(a):
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def model_weights(path, dtype):
    from coral.core.weight_tensor import WeightMetadata, WeightTensor

    out = {}
    for name, arr in read_safetensors(path):
        if dtype == "bf16" and arr.dtype == np.float32:
            arr = to_bf16_bits(arr)
        meta = WeightMetadata(name=name, shape=arr.shape, dtype=arr.dtype)
        out[name] = WeightTensor(data=arr, metadata=meta)
    return out


def maxrss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cmd_ingest(model, dtype, out, compression):
    from coral.storage.hdf5_store import HDF5Store

    weights = model_weights(model, dtype)
    nbytes = sum(w.data.nbytes for w in weights.values())
    base = maxrss_kb()
    comp = None if compression == "none" else compression
    opts = 4 if comp == "gzip" else None
    # Into a new file: removing the previous run's is not part of the measurement.
    if os.path.exists(out):
        os.remove(out)
    t = time.perf_counter()
    store = HDF5Store(out, compression=comp, compression_opts=opts, mode="w")
    keys = store.store_batch(weights)
    store.close()
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "nbytes": nbytes, "baseline_kb": base,
                      "peak_kb": maxrss_kb(), "keys": keys}))


def cmd_load(path):
    from coral.storage.hdf5_store import HDF5Store

    base = maxrss_kb()
    store = HDF5Store(path, mode="r")
    keys = store.list_weights()
    t = time.perf_counter()
    loaded = store.load_batch(keys)
    dt = time.perf_counter() - t
    nbytes = sum(w.data.nbytes for w in loaded.values())
    store.close()
    print(json.dumps({"seconds": dt, "nbytes": nbytes, "count": len(loaded),
                      "baseline_kb": base, "peak_kb": maxrss_kb()}))


def cmd_write(model, out):
    from coral.storage.hdf5_store import HDF5Store

    weights = model_weights(model, "fp32")
    with HDF5Store(out, mode="w") as store:
        keys = store.store_batch(weights)
    print(json.dumps(keys))


def cmd_verify(path):
    """coral-ml has no integrity option of its own: load every weight and check it against its
    key with coral-ml's own hash (what strict integrity means)."""
    from coral.storage.hdf5_store import HDF5Store

    out = {}
    with HDF5Store(path, mode="r") as store:
        for key in store.list_weights():
            w = store.load(key)
            actual = w.compute_hash(force=True)
            out[key] = {"name": w.metadata.name, "shape": list(w.shape),
                        "dtype": np.dtype(w.dtype).name, "ok": actual == key,
                        "layer_type": w.metadata.layer_type, "model_name": w.metadata.model_name,
                        "compression_info": w.metadata.compression_info, "hash": w.metadata.hash,
                        "sha256": hashlib.sha256(np.ascontiguousarray(w.data).tobytes()).hexdigest()}
    print(json.dumps(out))


def cmd_dump(path):
    import h5py
    import hdf5plugin  # noqa: F401  (registers zstd, id 32015)

    out = {}
    with h5py.File(path, "r") as f:
        for group in ("weights", "deltas"):
            if group not in f:
                continue
            for key, ds in f[group].items():
                data = ds[()]
                attrs = {}
                for k, v in ds.attrs.items():
                    if isinstance(v, np.ndarray):
                        v = v.tolist()
                    elif isinstance(v, (np.generic,)):
                        v = v.item()
                    elif isinstance(v, bytes):
                        v = v.decode()
                    attrs[k] = v
                out[group + "/" + key] = {
                    "attrs": attrs,
                    "h5dtype": str(data.dtype),
                    "shape": list(data.shape),
                    "sha256": hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest(),
                    "filters": [str(x) for x in ds._filters.keys()],
                    "filter_params": {str(k): [int(x) for x in v] if isinstance(v, tuple) else []
                                      for k, v in ds._filters.items()},
                }
    print(json.dumps(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"ingest": cmd_ingest, "load": cmd_load, "write": cmd_write, "verify": cmd_verify,
     "dump": cmd_dump}[cmd](*args)


if __name__ == "__main__":
    main()
