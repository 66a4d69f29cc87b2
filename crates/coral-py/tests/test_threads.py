"""Threads: one store used from many Python threads, and the GIL released inside Rust."""

import sys
import threading

import numpy as np

from coral_rs import WeightMetadata, WeightTensor
from coral_rs.storage import HDF5Store

from conftest import same_bytes, weight


def test_many_threads_one_store(store_path):
    with HDF5Store(store_path) as store:
        results, errors = {}, []

        def work(t):
            try:
                ws = {f"t{t}.{i}": weight(f"t{t}.{i}", shape=(32, 16), seed=t * 100 + i) for i in range(8)}
                keys = store.store_batch(ws)
                got = store.load_batch(list(keys.values()))
                for n, k in keys.items():
                    assert same_bytes(got[k].data, ws[n].data)
                results[t] = keys
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert len(store.list_weights()) == 6 * 8


def _python_ran_during(call) -> int:
    """How many times this (main) thread ran Python code while another thread was inside
    `call`. With the switch interval set far beyond the test's length, Python never takes the
    GIL from a thread that holds it: the main thread can run only when the worker releases it.
    A call that holds the GIL throughout gives 0."""
    inside = threading.Event()
    done = threading.Event()
    ready = threading.Event()

    def worker():
        ready.set()
        inside.set()
        try:
            call()
        finally:
            inside.clear()
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        ready.wait()
        count = 0
        while not done.is_set():
            if inside.is_set():
                count += 1
            done.wait(0.001)  # blocks without the GIL
        t.join()
    finally:
        sys.setswitchinterval(old)
    return count


def test_the_gil_is_released_while_hashing_storing_and_loading(store_path):
    big = np.random.default_rng(0).standard_normal(24 << 20).astype(np.float32)  # 96 MiB
    w = WeightTensor(big, WeightMetadata(name="big", shape=big.shape, dtype=big.dtype))
    with HDF5Store(store_path, compression="gzip", compression_opts=1) as store:
        for name, call in [
            ("compute_hash", lambda: w.compute_hash(force=True)),
            ("store", lambda: store.store(w)),
            ("load", lambda: store.load(w.compute_hash())),
        ]:
            # A busy machine may not schedule the main thread within one call: a few tries.
            assert any(_python_ran_during(call) > 0 for _ in range(3)), name
