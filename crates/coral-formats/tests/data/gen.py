"""Writes the NumPy fixtures of tests/numpy_files.rs into this folder.

Run with any Python that has numpy (the test environment's venv has it):

    target/pyenv/bin/python crates/coral-formats/tests/data/gen.py

Every array is a function of its shape (`np.arange`), so the Rust test rebuilds the expected
values without reading anything else. The files are committed; run this again only to change
them. Besides `np.save`, `np.savez` (stored members) and `np.savez_compressed` (deflated; both
already give each local header a ZIP64 extra field, as NumPy opens members with
`force_zip64=True`), it writes `.npz` files through `zipfile` with its ZIP64 limit lowered to
64 bytes, so that the central directory too has ZIP64 extra fields and the archive a ZIP64 end
record, as an archive over 4 GiB has.
"""

import io
import os
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def arr(dtype, shape):
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    a = np.arange(n, dtype=np.int64)
    if np.dtype(dtype).kind == "b":
        a = a % 3 == 1
    elif np.dtype(dtype).kind == "f":
        a = a.astype(np.float64) * 0.5 - 1.0
    else:
        a = a % 100
    return a.astype(dtype).reshape(shape)


ARRAYS = {
    "f4_2x3": arr("<f4", (2, 3)),
    "f8_4": arr("<f8", (4,)),
    "f2_3": arr("<f2", (3,)),
    "i8_5": arr("<i8", (5,)),
    "i4_2x2": arr("<i4", (2, 2)),
    "i2_3": arr("<i2", (3,)),
    "i1_4": arr("|i1", (4,)),
    "u8_2": arr("<u8", (2,)),
    "u4_3": arr("<u4", (3,)),
    "u2_3": arr("<u2", (3,)),
    "u1_5": arr("|u1", (5,)),
    "b1_4": arr("|b1", (4,)),
    "scalar_f8": arr("<f8", ()),
    "empty_f4": arr("<f4", (0,)),
    "empty_i4_2x0": arr("<i4", (2, 0)),
    "f4_1x2x3x1": arr("<f4", (1, 2, 3, 1)),
}


def main():
    for name, a in ARRAYS.items():
        np.save(os.path.join(HERE, name + ".npy"), a)
    # Refused by Coral, each with its own message.
    np.save(os.path.join(HERE, "big_endian_f4.npy"), arr(">f4", (3,)))
    np.save(os.path.join(HERE, "fortran_f4.npy"), np.asfortranarray(arr("<f4", (2, 3))))
    np.save(os.path.join(HERE, "complex_c8.npy"), arr("<f4", (2,)).astype("<c8"))
    np.save(
        os.path.join(HERE, "structured.npy"),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
    )

    some = {k: ARRAYS[k] for k in ("f4_2x3", "i8_5", "scalar_f8", "empty_f4", "b1_4", "u2_3")}
    np.savez(os.path.join(HERE, "savez.npz"), **some)
    np.savez_compressed(os.path.join(HERE, "savez_compressed.npz"), **some)
    np.savez(os.path.join(HERE, "empty.npz"))

    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 64
    try:
        for name, method in (("zip64.npz", zipfile.ZIP_STORED), ("zip64_deflated.npz", zipfile.ZIP_DEFLATED)):
            with zipfile.ZipFile(os.path.join(HERE, name), "w", method) as z:
                for k, a in some.items():
                    buf = io.BytesIO()
                    np.save(buf, a)
                    with z.open(k + ".npy", "w", force_zip64=True) as f:
                        f.write(buf.getvalue())
    finally:
        zipfile.ZIP64_LIMIT = limit
    for name in ("zip64.npz", "zip64_deflated.npz"):
        with np.load(os.path.join(HERE, name)) as back:
            for k, a in some.items():
                assert back[k].dtype == a.dtype and np.array_equal(back[k], a), (name, k)


if __name__ == "__main__":
    main()
