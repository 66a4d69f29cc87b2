"""Coral against the lossless weight compressors of PyPI, side by side in one run.

    python peers.py MODEL.safetensors CORAL_BIN [--runs 5] [--dir DIR]

The cases (all from the real model, all-MiniLM-L6-v2, fp32; every derived weight uses a fixed
seed):
- fp32: the model file itself;
- bf16: the model rounded to bfloat16 (round to nearest even);
- bf16 dense fine-tune: every fp32 element w becomes w + 1e-3*N(0,1)*|w|, then base and
  fine-tune are both rounded to bf16 (about 15% of the elements differ, by 1 ulp);
- fp32 sparse fine-tune: a tenth of the tensors multiplied by (1 + 1e-3*N(0,1)).

Coral runs three times: with its default codec (zstd's byte-plane encoder), with `--compression
coral` (the float codec, `coral-float-codec`) and with `--compression none` (no codec: the floor
of its times, hashing, HDF5 and the file writes). For each tool, whole commands: "compress" stores
the file (`coral add` into a new HDF5 store,
`lmz compress`, glyd's `compress` at level max); "decompress" writes it back (`coral export`,
`lmz decompress`, glyd's `decompress`) and the bytes are compared with the input. "Saved" is
1 - output/input for the whole output file (for Coral the store file, container included). A
fine-tune's cost is what the output grows by when the fine-tune joins the base: `coral add
--reference base`, `lmz append`, glyd's `compress_with_base`. Times are medians of --runs,
taken round robin (each run times every tool once).

`cargo xtask bench --bench peers` runs it with lmzip and glyd installed in the bench venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

PY = sys.executable


def read_st(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        dt = {"F32": "<f4", "I64": "<i8"}[t["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(t["shape"]).copy()
    return out, meta


def write_st(path, tensors):
    """A safetensors file: tensors in the given order; uint16 arrays are BF16 bits."""
    header, offset, blobs = {}, 0, []
    names = {"<f4": "F32", "<u2": "BF16", "<i8": "I64"}
    for name, a in tensors.items():
        dtype = names[a.dtype.str]
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def bf16(a):
    if a.dtype != np.float32:
        return a  # the position indices (int64) stay as they are
    bits = a.astype("<f4").view("<u4").astype(np.uint64)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.astype("<u2")


def make_cases(model, work):
    t, _ = read_st(model)
    rng = np.random.default_rng(20261201)
    files = {"fp32": model}
    files["bf16"] = os.path.join(work, "bf16.safetensors")
    write_st(files["bf16"], {n: bf16(a) for n, a in t.items()})
    floats = {n for n, a in t.items() if a.dtype == np.float32}
    dense = {n: (a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32) * np.abs(a)).astype(np.float32)
             if n in floats else a for n, a in t.items()}
    files["bf16-ft"] = os.path.join(work, "bf16-ft.safetensors")
    write_st(files["bf16-ft"], {n: bf16(a) for n, a in dense.items()})
    names = [n for n in t if n in floats]
    pick = set(rng.choice(len(names), size=max(1, len(names) // 10), replace=False).tolist())
    chosen = {names[i] for i in pick}
    sparse = {n: ((a * (1 + 1e-3 * rng.standard_normal(a.shape))).astype(np.float32) if n in chosen else a)
              for n, a in t.items()}
    files["fp32-ft"] = os.path.join(work, "fp32-ft.safetensors")
    write_st(files["fp32-ft"], sparse)
    b = bf16(np.concatenate([t[n].reshape(-1) for n in floats]))
    d = bf16(np.concatenate([dense[n].reshape(-1) for n in floats]))
    return files, float((b != d).mean())


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dt


def same(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            p, q = x.read(1 << 24), y.read(1 << 24)
            if p != q:
                return False
            if not p:
                return True


GLYD = """
import sys, glyd
op, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
if op == "c":
    out = glyd.compress(open(a, "rb").read(), level="max")
elif op == "d":
    out = glyd.decompress(open(a, "rb").read())
else:  # fine-tune against a base: base a, fine-tune b, out argv[4]
    out = glyd.compress_with_base(open(a, "rb").read(), open(b, "rb").read())
    b = sys.argv[4]
open(b, "wb").write(out)
"""


class Coral:
    """`coral` with the codec of new weights: zstd (its default) or coral (the float codec)."""

    def __init__(self, bin, compression):
        self.bin = bin
        self.compression = compression
        self.name = "Coral" if compression == "zstd" else f"Coral {compression}"

    def version(self):
        v = subprocess.run([self.bin, "--version"], capture_output=True, text=True).stdout.strip()
        return f"{v} --compression {self.compression}"

    def cmd(self, out, *args):
        return [self.bin, "--quiet", "--compression", self.compression, "--store", out, *args]

    def compress(self, src, out):
        return timed(self.cmd(out, "add", src, "--name", "m", "--reference", "none"))

    def decompress(self, out, dst):
        return timed(self.cmd(out, "export", "m", dst))

    def finetune(self, base, ft, out):
        self.compress(base, out)
        before = os.path.getsize(out)
        timed(self.cmd(out, "add", ft, "--name", "ft", "--reference", "m"))
        return os.path.getsize(out) - before


class Lmzip:
    name = "lmzip"

    def version(self):
        from importlib.metadata import version
        return "lmzip " + version("lmzip")

    def compress(self, src, out):
        return timed([PY, "-m", "lmz", "compress", "-q", "-f", src, out])

    def decompress(self, out, dst):
        return timed([PY, "-m", "lmz", "decompress", "-q", "-f", out, dst])

    def finetune(self, base, ft, out):
        self.compress(base, out)
        before = os.path.getsize(out)
        timed([PY, "-m", "lmz", "append", "-q", out, ft])
        return os.path.getsize(out) - before


class Glyd:
    name = "glyd"

    def version(self):
        from importlib.metadata import version
        return "glyd " + version("glyd")

    def compress(self, src, out):
        return timed([PY, "-c", GLYD, "c", src, out])

    def decompress(self, out, dst):
        return timed([PY, "-c", GLYD, "d", out, dst])

    def finetune(self, base, ft, out):
        timed([PY, "-c", GLYD, "b", base, ft, out])
        return os.path.getsize(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("coral")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("CORAL_BENCH_RUNS", "5")))
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="coral-peers-", dir=args.dir)
    try:
        files, changed = make_cases(args.model, work)
        # `none` (no codec at all) is the floor of Coral's times: hashing, HDF5, the file writes.
        tools = [Coral(args.coral, c) for c in ("zstd", "coral", "none")] + [Lmzip(), Glyd()]
        rows = {tool.name: {"version": tool.version()} for tool in tools}
        for case in ("fp32", "bf16"):
            src = files[case]
            n = os.path.getsize(src)
            ct = {tool.name: [] for tool in tools}
            dt = {tool.name: [] for tool in tools}
            size = {}
            # Round robin: each run times every tool once, so a change in the machine's load
            # reaches every tool alike rather than the ones that happened to run then.
            for i in range(args.runs):
                for tool in tools:
                    out = os.path.join(work, f"{tool.name}.{case}.{i}.out")
                    dst = os.path.join(work, f"{tool.name}.{case}.{i}.back")
                    ct[tool.name].append(tool.compress(src, out))
                    dt[tool.name].append(tool.decompress(out, dst))
                    if not same(src, dst):
                        raise SystemExit(f"{tool.name} did not give {case} back bit for bit")
                    size[tool.name] = os.path.getsize(out)
                    os.remove(dst)
                    if os.path.isdir(out):
                        shutil.rmtree(out)
                    else:
                        os.remove(out)
            for tool in tools:
                c, d = ct[tool.name], dt[tool.name]
                rows[tool.name][case] = {
                    "saved": 1 - size[tool.name] / n, "c": n / statistics.median(c) / 1e6,
                    "d": n / statistics.median(d) / 1e6, "ct": c, "dt": d}
        for tool in tools:
            r = rows[tool.name]
            for case, base in (("bf16-ft", "bf16"), ("fp32-ft", "fp32")):
                out = os.path.join(work, f"{tool.name}.{case}.out")
                r[case] = tool.finetune(files[base], files[case], out)
                os.remove(out)
        print(f"\nall-MiniLM-L6-v2: fp32 {os.path.getsize(files['fp32']) / 1e6:.1f} MB, bf16 "
              f"{os.path.getsize(files['bf16']) / 1e6:.1f} MB; the bf16 dense fine-tune changes "
              f"{changed:.1%} of the elements; medians of {args.runs} runs, side by side, "
              f"{os.cpu_count()} cores; every round trip bit for bit\n")
        print("| tool | fp32 saved | bf16 saved | compress MB/s fp32 / bf16 | decompress MB/s fp32 / bf16 | bf16 dense fine-tune | fp32 sparse fine-tune |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {r['version']} | {r['fp32']['saved']:.2%} | {r['bf16']['saved']:.2%} | "
                  f"{r['fp32']['c']:.0f} / {r['bf16']['c']:.0f} | {r['fp32']['d']:.0f} / {r['bf16']['d']:.0f} | "
                  f"{r['bf16-ft'] / 1e6:.2f} MB | {r['fp32-ft'] / 1e6:.2f} MB |")
        l = rows["lmzip"]
        for name in ("Coral", "Coral coral", "Coral none"):
            c = rows[name]
            print(f"\n{name} against lmzip: compress {c['fp32']['c'] / l['fp32']['c']:.2f}× / "
                  f"{c['bf16']['c'] / l['bf16']['c']:.2f}×, decompress {c['fp32']['d'] / l['fp32']['d']:.2f}× / "
                  f"{c['bf16']['d'] / l['bf16']['d']:.2f}× (fp32 / bf16)")
        print("\nruns (compress / decompress, s):")
        for name, r in rows.items():
            for case in ("fp32", "bf16"):
                print(f"  {name} {case}: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r[case]["ct"], r[case]["dt"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
