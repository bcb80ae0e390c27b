"""The cluster shape offline: PortableRunner with an external SDK worker pool on loopback,
started in another directory than the launcher (so a path resolved on a worker would miss) and
without the launcher's environment (so the key reaches workers only as a real cluster's would)."""

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

from beam_caption.testing.fake_vlm import FakeVLMConfig, FakeVLMServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def worker_pool(tmp_path):
    """``worker_pool_main`` on 127.0.0.1 in its own directory; yields its address."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    port = _free_port()
    log = (pool_dir / "pool.log").open("w")
    env = {name: value for name, value in os.environ.items()
           if name not in ("DF_API_KEY", "OPENAI_API_KEY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         f"--service_port={port}"], cwd=pool_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its SDK workers are its children: stop the whole group
    deadline = time.monotonic() + 60
    while not _accepts(port):  # its log says nothing at start unless logging is configured
        assert process.poll() is None and time.monotonic() < deadline, \
            (pool_dir / "pool.log").read_text()
        time.sleep(0.05)
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


def _portable(address: str) -> list[str]:
    return ["--runner", "PortableRunner", "--job_endpoint", "embed",
            "--environment_type", "EXTERNAL", "--environment_config", address]


@pytest.mark.parametrize("mode", ["in_memory", "multi_processing"])
def test_local_runners_give_the_captions_the_worker_pool_gives(dataset_factory, tmp_path, mode):
    # With the Portable test above: one 40-record manifest set, the same captions everywhere.
    data = dataset_factory(40, files=2)
    with FakeVLMServer() as server:
        result = run_cli(["--runner", "FnApiRunner", "--direct_running_mode", mode,
                          "--direct_num_workers", "2", "--input", ",".join(data.manifests),
                          "--image_root", str(data.root), "--api_url", server.url,
                          "--model", "fake-vlm"], tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.failures
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected


def test_pool_workers_read_the_key_file_and_stop_the_job_when_it_is_refused(
        dataset_factory, tmp_path, worker_pool):
    address, _ = worker_pool
    data = dataset_factory(30, files=1)
    launch_dir = data.root
    no_env_key = {"DF_API_KEY": "", "OPENAI_API_KEY": ""}
    (launch_dir / "key").write_text("sk-right\n")
    with FakeVLMServer(FakeVLMConfig(api_key="sk-right")) as server:
        args = [*_portable(address), "--input", os.path.relpath(data.manifests[0], launch_dir),
                "--image_root", ".", "--api_url", server.url, "--model", "fake-vlm",
                "--api_key_file", "key"]
        keyed = run_cli(args, Path("out"), cwd=launch_dir, env=no_env_key, timeout=300)
        assert keyed.returncode == 0, keyed.stderr[-3000:]
        written = RunResult(0, "", "", launch_dir / "out")
        assert len(written.captions) == 30 and not written.failures
        # The key is revoked between the launcher's check and the workers' requests: the
        # workers' breaker stops the job after a few refusals instead of failing 30 records.
        (launch_dir / "key").write_text("sk-revoked\n")
        server.reset_stats()
        stopped = run_cli([*args, "--skip_preflight", "--max_concurrency", "1"], Path("out2"),
                          cwd=launch_dir, env=no_env_key, timeout=300)
        refused = server.stats()["by_status"].get("401", 0)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "HTTP 401" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert 0 < refused < 30
    assert not list((launch_dir / "out2").glob("failures-*"))
