"""Entropy bounds of bf16 weight fields under candidate contexts: what a float codec could gain.

    python float_bounds.py MODEL.safetensors

For every F32 tensor of the model, rounded to bfloat16 (nearest even), prints the empirical
conditional entropy, summed over tensors, of the sign `s`, the exponent `e` and the mantissa `m`
given a few contexts. Each is the cost of an ideal order-0 coder with one exactly fitted table per
tensor and context value, tables free: a lower bound for the static context models
`coral-float-codec` uses (its tables are sent and fitted per chunk), and an optimistic one for
contexts with many values (a table per column fits noise: see `m | e, column`).

Contexts: `column` (the index within a row of a 2-D tensor), `row mean` and `column mean` (the
mean exponent of the value's row or column, in half exponents, which a two-pass coder would send).
The codec's own context, the running mean of the exponents before each value, is measured by the
codec itself: `cargo run --release -p coral-float-codec --example measure -- MODEL`.
Only numpy is needed. docs/benchmarks.md ("Peers") quotes a run.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np


def entropy(counts):
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def cond(ctx, sym, alphabet):
    """Bits to code `sym` given `ctx` with one ideal table per context value."""
    ctx = ctx.astype(np.int64)
    return entropy(np.bincount(ctx * alphabet + sym)) - entropy(np.bincount(ctx))


def main():
    raw = open(sys.argv[1], "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    total, values = {}, 0
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        u = np.frombuffer(raw[base + a:base + b], dtype="<u4").astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        s = (r >> 15).astype(np.int64)
        e = ((r >> 7) & 0xFF).astype(np.int64)
        m = (r & 0x7F).astype(np.int64)
        values += e.size
        shape = t["shape"]
        if len(shape) == 2 and shape[0] > 1:
            rows, cols = shape
            grid = e.reshape(rows, cols)
            col = np.tile(np.arange(cols), rows)
            row_mean = np.repeat(np.round(grid.mean(1) * 2).astype(np.int64), cols)
            col_mean = np.tile(np.round(grid.mean(0) * 2).astype(np.int64), rows)
            row_mean -= row_mean.min()
            col_mean -= col_mean.min()
        else:
            col = row_mean = col_mean = np.zeros(e.size, np.int64)
        for k, bits in (
            ("s", entropy(np.bincount(s))),
            ("s | column", cond(col, s, 2)),
            ("e", entropy(np.bincount(e))),
            ("e | column", cond(col, e, 256)),
            ("e | row mean", cond(row_mean, e, 256)),
            ("e | row mean, column mean", cond(row_mean * 1024 + col_mean, e, 256)),
            ("m | e", cond(e, m, 128)),
            ("m | e, column mean", cond(e * 1024 + col_mean, m, 128)),
            ("m | e, column", cond(e * 65536 + col, m, 128)),
        ):
            total[k] = total.get(k, 0.0) + bits
    print(f"{values} bf16 values ({2 * values / 1e6:.1f} MB)")
    for k, bits in total.items():
        print(f"{k:28s} {bits / 8e3:10.1f} KB  {bits / values:.4f} bits/value")
    best = total["s | column"] + total["e | row mean, column mean"] + total["m | e, column mean"]
    plain = total["s"] + total["e"] + total["m | e"]
    print(f"s + e + m|e: {plain / 8e6:.3f} MB ({1 - plain / 8 / (2 * values):.2%} saved); "
          f"s|column + e|row mean, column mean + m|e, column mean: {best / 8e6:.3f} MB "
          f"({1 - best / 8 / (2 * values):.2%} saved)")


if __name__ == "__main__":
    main()
