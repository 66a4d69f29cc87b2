"""Model-level functions on the real model: add, list, export byte for byte."""

import hashlib
import shutil

import pytest

import coral_rs
from coral_rs.storage import HDF5Store


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_add_list_export_a_file(model_path, tmp_path):
    with HDF5Store(tmp_path / "s.h5", compression="zstd") as store:
        r = coral_rs.add(store, model_path, name="minilm")
        assert r["name"] == "minilm" and r["tensors"] > 50 and r["new"] == r["tensors"]
        again = coral_rs.add(store, model_path, name="minilm-again")
        assert again["new"] == 0 and again["reused"] == r["tensors"]
        assert coral_rs.list_models(store) == ["minilm", "minilm-again"]
        out = tmp_path / "back.safetensors"
        n = coral_rs.export(store, "minilm", out)
        assert n == out.stat().st_size and sha(out) == sha(model_path)
        with pytest.raises(ValueError, match="nope"):
            coral_rs.export(store, "nope", tmp_path / "x.safetensors")


def test_add_and_export_a_folder(model_path, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(model_path, folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden_size": 384}')
    with HDF5Store(tmp_path / "s.h5") as store:
        r = coral_rs.add(store, folder)
        assert r["name"] == "model"
        out = tmp_path / "out"
        coral_rs.export(store, "model", out)
        assert sha(out / "model.safetensors") == sha(model_path)
        assert (out / "config.json").read_text() == '{"hidden_size": 384}'


def test_add_bad_input(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with HDF5Store(tmp_path / "s.h5") as store:
        with pytest.raises((ValueError, OSError), match="bad.safetensors"):
            coral_rs.add(store, bad)
        assert coral_rs.list_models(store) == [] and store.list_weights() == []
        with pytest.raises(OSError):
            coral_rs.add(store, tmp_path / "missing.safetensors")
