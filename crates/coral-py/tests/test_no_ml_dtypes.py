"""Without ml_dtypes, bf16 and fp8 come back as uint views with the dtype's name."""

import subprocess
import sys
import textwrap


def test_uint_views_without_ml_dtypes(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ml_dtypes"] = None  # as if it were not installed
        import numpy as np
        import coral_rs
        from coral_rs import WeightMetadata, WeightTensor
        from coral_rs.storage import HDF5Store
        assert not coral_rs.has_ml_dtypes()
        bits = np.array([0x3F80, 0x7FC1, 0x0001, 0x8000], dtype=np.uint16)
        w = WeightTensor(bits, WeightMetadata("b", (4,), bits.dtype, dtype_name="bfloat16"))
        with HDF5Store({str(tmp_path / 's.h5')!r}) as store:
            key = store.store(w)
            back = store.load(key)
            assert back.data.dtype == np.uint16, back.data.dtype
            assert back.metadata.dtype_name == "bfloat16"
            assert back.data.tolist() == bits.tolist()
            # stored back as it came, it is the same bf16 weight
            assert store.store(back) == key
            # a plain uint16 array is another weight
            plain = WeightTensor(bits, WeightMetadata("b", (4,), bits.dtype))
            assert store.store(plain) != key
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
