"""The cluster shape offline: PortableRunner with an external SDK worker pool on loopback,
started in another directory than the launcher, so a path resolved on a worker would miss."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunResult, run_cli

from beam_caption.testing.fake_vlm import FakeVLMServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def worker_pool(tmp_path):
    """``worker_pool_main`` on 127.0.0.1 in its own directory; yields its address."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    port = _free_port()
    log = (pool_dir / "pool.log").open("w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         f"--service_port={port}"], cwd=pool_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its SDK workers are its children: stop the whole group
    deadline = time.monotonic() + 60
    while "Started worker pool" not in (pool_dir / "pool.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, \
            (pool_dir / "pool.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", pool_dir
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
    log.close()


def test_portable_runner_with_relative_paths_gives_the_in_memory_captions(
        dataset_factory, tmp_path, worker_pool):
    address, pool_dir = worker_pool
    data = dataset_factory(40, files=2)
    launch_dir = data.root
    with FakeVLMServer() as server:
        result = run_cli(
            ["--runner", "PortableRunner", "--job_endpoint", "embed",
             "--environment_type", "EXTERNAL", "--environment_config", address,
             "--input", ",".join(os.path.relpath(m, launch_dir) for m in data.manifests),
             "--image_root", ".", "--api_url", server.url, "--model", "fake-vlm"],
            Path("out"), cwd=launch_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SdkHarness" in (pool_dir / "pool.log").read_text()  # the pool's workers ran it
    written = RunResult(0, "", "", launch_dir / "out")
    assert not written.failures
    assert {r["id"]: r["caption"] for r in written.captions} == data.expected
    assert written.summary["captioned"] == 40
    assert not list(pool_dir.glob("out"))  # nothing was written in the workers' directory
