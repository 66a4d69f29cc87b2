"""S3Store on the S3-compatible test server xtask starts on 127.0.0.1, and sync both ways."""

from coral_rs.storage import HDF5Store, S3Config, S3Store

from conftest import same_bytes, weight


def test_s3_config_defaults_are_the_seeds():
    c = S3Config(bucket="b")
    assert (c.prefix, c.region, c.endpoint_url, c.max_concurrency, c.compression, c.chunk_size) == (
        "coral/", None, None, 10, "gzip", 8 * 1024 * 1024)
    shown = repr(S3Config(bucket="b", access_key="AKIDSECRET", secret_key="s3cr3t"))
    assert "AKIDSECRET" not in shown and "s3cr3t" not in shown


def test_every_method_on_s3(s3_config):
    ws = {f"w{i}": weight(f"w{i}", shape=(16, 4 + i), seed=i) for i in range(5)}
    with S3Store(s3_config) as store:
        keys = store.store_batch(ws)
        assert sorted(store.list_weights()) == sorted(keys.values())
        k = keys["w0"]
        assert store.exists(k) and store.get_metadata(k).name == "w0"
        assert same_bytes(store.load(k).data, ws["w0"].data)
        got = store.load_batch(list(keys.values()))
        assert all(same_bytes(got[keys[n]].data, ws[n].data) for n in ws)
        assert store.load("not-a-key") is None
        info = store.get_storage_info()
        assert info["total_weights"] == 5 and info["backend"] == "s3"
        assert store.delete(k) and not store.exists(k)


def test_sync_both_ways(s3_config, tmp_path):
    ws = {f"w{i}": weight(f"w{i}", shape=(8, 8), seed=i) for i in range(4)}
    with HDF5Store(tmp_path / "local.h5") as local, S3Store(s3_config) as remote:
        keys = local.store_batch(ws)
        up = remote.sync_from_local(local)
        assert (up["uploaded"], up["skipped"]) == (4, 0) and up["bytes_transferred"] > 0
        again = remote.sync_from_local(local)
        assert (again["uploaded"], again["skipped"]) == (0, 4)
        with HDF5Store(tmp_path / "copy.h5") as copy:
            down = remote.sync_to_local(copy)
            assert down["downloaded"] == 4
            for n, k in keys.items():
                assert same_bytes(copy.load(k).data, ws[n].data)
