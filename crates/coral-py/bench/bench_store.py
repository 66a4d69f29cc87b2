"""coral_rs against coral-ml 1.0.0's HDF5Store, side by side in one run, on a real model.

Both stores write gzip level 4 (the seed's default). Each run times, on a new file:
- store_batch of every tensor of the model, then close (Coral's close syncs the file to disk,
  coral-ml's does not);
- load_batch of every key on the store reopened read-only (Coral verifies every weight against
  its key; coral-ml does not verify).
Every load is compared with the model's tensors outside the timings. Runs alternate between
the stores; the table gives medians and the ratios of the medians.

    python bench_store.py MODEL.safetensors [--runs 5] [--dir DIR]

`cargo xtask bench --bench python` runs it with the real model (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import tempfile
import time

import numpy as np

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
             "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """name -> numpy array (copies, so nothing maps the file)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        arr = np.frombuffer(raw[base + a:base + b], dtype=ST_DTYPES[t["dtype"]]).reshape(t["shape"]).copy()
        out[name] = arr
    return out


def ml_weights(arrays):
    from coral.core.weight_tensor import WeightMetadata, WeightTensor

    return {n: WeightTensor(data=a, metadata=WeightMetadata(name=n, shape=a.shape, dtype=a.dtype))
            for n, a in arrays.items()}


def rs_weights(arrays):
    from coral_rs import WeightMetadata, WeightTensor

    return {n: WeightTensor(a, WeightMetadata(name=n, shape=a.shape, dtype=a.dtype))
            for n, a in arrays.items()}


def run_coral_ml(path, weights):
    from coral.storage.hdf5_store import HDF5Store

    t0 = time.perf_counter()
    s = HDF5Store(str(path), compression="gzip", compression_opts=4, mode="w")
    keys = s.store_batch(weights)
    s.close()
    t1 = time.perf_counter()
    s = HDF5Store(str(path), mode="r")
    got = s.load_batch(list(keys.values()))
    t2 = time.perf_counter()
    s.close()
    return t1 - t0, t2 - t1, keys, got


def run_coral_rs(path, weights):
    from coral_rs.storage import HDF5Store

    t0 = time.perf_counter()
    s = HDF5Store(path, compression="gzip", compression_opts=4, mode="w")
    keys = s.store_batch(weights)
    s.close()
    t1 = time.perf_counter()
    s = HDF5Store(path, mode="r")
    got = s.load_batch(list(keys.values()))
    t2 = time.perf_counter()
    s.close()
    return t1 - t0, t2 - t1, keys, got


def check(arrays, keys, got, who):
    for n, a in arrays.items():
        b = got[keys[n]].data
        if b.shape != a.shape or b.tobytes() != a.tobytes():
            raise SystemExit(f"{who}: {n} came back different")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("CORAL_BENCH_RUNS", "5")))
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    import coral_rs

    arrays = read_safetensors(args.model)
    nbytes = sum(a.nbytes for a in arrays.values())
    work = tempfile.mkdtemp(prefix="coral-pybench-", dir=args.dir)
    cases = {
        "coral-ml 1.0.0 HDF5Store": (run_coral_ml, ml_weights(arrays)),
        "coral_rs HDF5Store (SHA-256 keys)": (run_coral_rs, rs_weights(arrays)),
        "coral_rs HDF5Store, coral-ml's objects (xxh3 keys)": (run_coral_rs, ml_weights(arrays)),
    }
    times = {c: ([], []) for c in cases}
    sizes = {}
    try:
        for r in range(args.runs):
            for i, (case, (fn, weights)) in enumerate(cases.items()):
                path = os.path.join(work, f"{i}.h5")
                st, ld, keys, got = fn(path, weights)
                check(arrays, keys, got, case)
                times[case][0].append(st)
                times[case][1].append(ld)
                sizes[case] = os.path.getsize(path)
                del got
                os.remove(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = "coral-ml 1.0.0 HDF5Store"
    med = {c: (statistics.median(s), statistics.median(l)) for c, (s, l) in times.items()}
    print(f"\nModel: {os.path.basename(os.path.dirname(args.model)) or args.model}, "
          f"{len(arrays)} tensors, {nbytes / 1e6:.1f} MB; gzip level 4; medians of {args.runs} runs, "
          f"side by side; coral_rs {coral_rs.__version__}, HDF5 {coral_rs.HDF5_VERSION}, "
          f"{os.cpu_count()} cores\n")
    print("| store | store_batch | ×coral-ml | load_batch | ×coral-ml | file MB | verified |")
    print("|---|---|---|---|---|---|---|")
    for c, (s, l) in med.items():
        bs, bl = med[base]
        print(f"| {c} | {s:.3f} s ({nbytes / s / 1e6:.0f} MB/s) | {bs / s:.1f}× | "
              f"{l:.3f} s ({nbytes / l / 1e6:.0f} MB/s) | {bl / l:.1f}× | {sizes[c] / 1e6:.1f} | "
              f"{'no' if c == base else 'yes'} |")
    print("\nruns (store_batch / load_batch, s):")
    for c, (s, l) in times.items():
        print(f"  {c}: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(s, l)))


if __name__ == "__main__":
    main()
