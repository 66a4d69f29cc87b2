"""Deltas written by the Python Coral (coral-ml 1.0), for tests/delta_python.rs.

Prints JSON: for each dtype and delta type, the reference bytes, the delta as the Python store
keeps it (data bytes, metadata, shape, dtype) and the bytes the Python decoder rebuilds.
"""
import json
import sys
import warnings

import numpy as np
from coral.core.weight_tensor import WeightMetadata, WeightTensor
from coral.delta.delta_encoder import DeltaConfig, DeltaEncoder, DeltaType

warnings.simplefilter("ignore")
rng = np.random.default_rng(7)
out = []
for dtype in ["float32", "float16", "float64"]:
    ref = (rng.standard_normal((16, 24)) * 0.05).astype(dtype)
    tgt = ref.copy()
    mask = rng.random(ref.shape) < 0.3
    tgt[mask] = (ref[mask] * (1 + 1e-2 * rng.standard_normal(mask.sum()))).astype(dtype)
    r = WeightTensor(data=ref, metadata=WeightMetadata(name="r", shape=ref.shape, dtype=ref.dtype))
    t = WeightTensor(data=tgt, metadata=WeightMetadata(name="t", shape=tgt.shape, dtype=tgt.dtype))
    for kind in ["float32_raw", "compressed", "int8_quantized", "int16_quantized", "sparse"]:
        enc = DeltaEncoder(DeltaConfig(delta_type=DeltaType(kind), sparse_threshold=1e-4))
        d = enc.encode_delta(t, r)
        back = enc.decode_delta(d, r)
        meta = json.loads(json.dumps(d.metadata, default=lambda o: list(o) if isinstance(o, tuple) else float(o)))
        if not all(np.isfinite(v) for v in meta.values() if isinstance(v, float)):
            # coral-ml 1.0 overflows the float16 int16 scale; such a delta is not worth a vector.
            continue
        out.append(
            {
                "delta_type": kind,
                "dtype": dtype,
                "shape": list(ref.shape),
                "reference": ref.tobytes().hex(),
                "data": np.ascontiguousarray(d.data).tobytes().hex(),
                "metadata": meta,
                "decoded": np.asarray(back.data, dtype=dtype).tobytes().hex(),
            }
        )
json.dump(out, sys.stdout, allow_nan=False)
