"""Fixtures of the coral_rs suite. `cargo xtask test` runs it in the test venv with the model and
the S3 test servers (loopback only) in the environment, and CORAL_TEST_REQUIRE=1, under which
a missing model or server fails the suite instead of skipping."""

import os
import uuid

import numpy as np
import pytest

from coral_rs import WeightMetadata, WeightTensor

REQUIRE = os.environ.get("CORAL_TEST_REQUIRE") == "1"


def need(var: str) -> str:
    v = os.environ.get(var)
    if not v:
        if REQUIRE:
            pytest.fail(f"{var} is not set (cargo xtask test sets it)")
        pytest.skip(f"{var} is not set: run through cargo xtask test")
    return v


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store.h5"


@pytest.fixture
def model_path():
    return need("CORAL_TEST_MODEL")


@pytest.fixture
def s3_config():
    from coral_rs.storage import S3Config

    endpoint = need("CORAL_TEST_S3_ENDPOINT")
    assert endpoint.startswith("http://127.0.0.1:"), endpoint
    return S3Config(
        bucket=f"py-{uuid.uuid4().hex[:16]}",
        endpoint_url=endpoint,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID", "coral-test"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "coral-test"),
        region="us-east-1",
    )


def weight(name="w", shape=(4, 5), dtype=np.float32, seed=0, **meta):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(int(np.prod(shape))) * 0.02).astype(dtype).reshape(shape)
    return WeightTensor(data, WeightMetadata(name=name, shape=tuple(shape), dtype=data.dtype, **meta))


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()
