"""Shared fixtures: generated image datasets, the object-storage emulators (``gcs``, ``s3``), and
the CLI run in this process (``run_cli``) or, where the process itself is under test, in a real
one (``run_cli_process``).

Every ``python -m beam_caption`` this session starts is counted: the session fails past
CLI_PROCESS_LIMIT (each costs seconds of imports), and the count is shown at its end."""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec
import pytest
from PIL import Image

from beam_caption.core.client import ClientSettings
from beam_caption.core.engine import WorkerConfig
from beam_caption.core.images import ImageSettings
from beam_caption.core.request import PromptSettings
from beam_caption.testing import caption_for_images

LEVELS = (0, 51, 102, 153, 204, 255)
SIZES = ((96, 64), (64, 96), (80, 80))  # landscape, portrait, square
TEST_RUNNER = ["--runner=FnApiRunner"]


def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 6], LEVELS[(i // 6) % 6], LEVELS[(i // 36) % 6]


@dataclass
class Dataset:
    """A manifest of generated images and the caption the fake server must give each record."""

    root: Path
    manifests: list[str] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # record id -> caption
    bad: dict[str, str] = field(default_factory=dict)  # record id -> expected error type

    @property
    def total(self) -> int:
        return len(self.expected) + len(self.bad)


def make_image(root: Path, i: int, fmt: str = "png") -> tuple[str, str]:
    """Write image i and return (relative path, its caption).

    Colour and orientation together are unique for i < 648, and so is the caption.
    """
    size = SIZES[(i + i // 216) % 3]
    image = Image.new("RGB", size, colour(i * 7 + 1))
    name = f"images/img{i:05d}.{fmt}"
    (root / "images").mkdir(parents=True, exist_ok=True)
    image.save(root / name)
    return name, caption_for_images([image])


def make_dataset(root: Path, n: int, *, files: int = 2, bad_records: bool = False) -> Dataset:
    """n good records over `files` manifests (alternating JSONL and JSON array)."""
    data = Dataset(root)
    per_file: list[list[dict]] = [[] for _ in range(files)]
    for i in range(n):
        name, caption = make_image(root, i, "jpg" if i % 4 == 0 else "png")
        record = {"id": f"r{i}", "image": [name],
                  "conversation": [{"from": "human", "value": f"Describe image {i}."}]}
        per_file[i % files].append(record)
        data.expected[record["id"]] = caption
    if bad_records:
        per_file[0].append({"id": "missing", "image": ["images/nope.png"],
                            "conversation": [{"from": "human", "value": "q"}]})
        data.bad["missing"] = "image_not_found"
        per_file[0].append({"id": "rejected", "image": [make_image(root, 9999)[0]],
                            "conversation": [{"from": "human", "value": "REJECT_400 please"}]})
        data.bad["rejected"] = "content_policy"
    for index, records in enumerate(per_file):
        if index % 2 == 0:
            path = root / f"manifest{index}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path = root / f"manifest{index}.json"
            path.write_text(json.dumps(records, indent=1))
        data.manifests.append(str(path))
    return data


def read_jsonl(pattern: str) -> list[dict]:
    lines = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    output: Path

    @property
    def captions(self) -> list[dict]:
        return read_jsonl(str(self.output / "captions-*.jsonl"))

    @property
    def failures(self) -> list[dict]:
        return read_jsonl(str(self.output / "failures-*.jsonl"))

    @property
    def summary(self) -> dict:
        return json.loads((self.output / "summary.json").read_text())


CLI_PROCESS_LIMIT = 20  # real `python -m beam_caption` processes in the whole suite
CLI_PROCESSES: list[str] = []  # the test that started each one


def _is_cli_process(args) -> bool:
    words = [str(arg) for arg in args] if isinstance(args, (list, tuple)) else [str(args)]
    return any(words[i:i + 2] == ["-m", "beam_caption"] for i in range(len(words)))


class _CountingPopen(subprocess.Popen):
    """subprocess.Popen (subprocess.run uses it too), counting the CLI processes it starts."""

    def __init__(self, args, *rest, **kwargs):
        if _is_cli_process(args):
            CLI_PROCESSES.append(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
        super().__init__(args, *rest, **kwargs)


subprocess.Popen = _CountingPopen  # type: ignore[misc]


TEST_PROCESS_LIMIT = 4  # pytest-xdist workers of `-n auto` (pytest.ini): one per core, at most


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a test process per core this process may use (2 on CI), at most
    TEST_PROCESS_LIMIT; none but this one on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) < 2 else min(cores, TEST_PROCESS_LIMIT)  # type: ignore[operator]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Under pytest-xdist, the controller counts the CLI processes each worker started."""
    CLI_PROCESSES.extend(getattr(node, "workeroutput", {}).get("cli_processes", []))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"real CLI processes (python -m beam_caption): "
                                f"{len(CLI_PROCESSES)} of at most {CLI_PROCESS_LIMIT}")


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its controller counts and judges
        workeroutput["cli_processes"] = CLI_PROCESSES
        return
    if len(CLI_PROCESSES) > CLI_PROCESS_LIMIT:
        print(f"\n{len(CLI_PROCESSES)} real CLI processes, over CLI_PROCESS_LIMIT "
              f"{CLI_PROCESS_LIMIT}: run the CLI in this process (run_cli) unless the process "
              f"itself is under test; started by: {', '.join(CLI_PROCESSES)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run_cli(args: list[str], output: Path, *, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 240, stderr: IO[str] | None = None) -> RunResult:
    """``python -m beam_caption ARGS --output OUTPUT`` as ``main`` in this process (see
    ``run_main``)."""
    returncode, out, err = run_main([*args, "--output", str(output)], env=env, cwd=cwd,
                                    timeout=timeout, stderr=stderr)
    return RunResult(returncode, out, err, output)


def run_cli_process(args: list[str], output: Path, *, env: dict | None = None,
                    cwd: Path | None = None, timeout: float = 240) -> RunResult:
    """``python -m beam_caption ARGS --output OUTPUT`` in a real process, for the tests of the
    process itself (signals, kills, ``python -m``): seconds of imports each, counted."""
    process = subprocess.run(
        [sys.executable, "-m", "beam_caption", *args, "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
        timeout=timeout)
    return RunResult(process.returncode, process.stdout, process.stderr, output)


def run_main(argv: list[str], *, env: dict | None = None, cwd: Path | None = None,
             timeout: float = 240, stderr: IO[str] | None = None) -> tuple[int, str, str]:
    """``beam_caption.cli.main.main(argv)`` in this process as ``python -m beam_caption ARGV``
    would run it: (exit status, stdout, stderr).

    For the call, ``env`` is added to os.environ, ``cwd`` is the working directory, stdout and
    stderr are strings (or stderr is the ``stderr`` given, a terminal's), the root logger has
    no handler (so the CLI's own logging setup binds one to that stderr, as in a fresh
    process), and a run past ``timeout`` seconds raises subprocess.TimeoutExpired. After it,
    everything the CLI may change in the process is as it was: environment, working
    directory, sys.argv, logging handlers and levels, signal handlers, Beam's filesystem
    options and fsspec's configuration from the environment."""
    from beam_caption.cli.main import main

    stdout, captured = io.StringIO(), io.StringIO()
    deadline = _Deadline(timeout, argv)
    with contextlib.ExitStack() as restore:
        restore.enter_context(_environment(env or {}))
        if cwd is not None:
            restore.enter_context(contextlib.chdir(cwd))
        restore.enter_context(_kept_logging())
        for name, value in (("argv", [sys.argv[0], *argv]), ("stdout", stdout),
                            ("stderr", stderr or captured)):
            restore.callback(setattr, sys, name, getattr(sys, name))
            setattr(sys, name, value)
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signal_number)
            if handler is not None:  # None: not set from Python, and not settable back
                restore.callback(signal.signal, signal_number, handler)
        restore.enter_context(_kept_beam_options())
        crash: Exception | None = None
        try:
            with deadline:
                returncode = main(list(argv))
        except SystemExit as exc:  # argparse's --help and its errors
            returncode = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception as exc:  # as the interpreter reports an uncaught exception
            crash, returncode = exc, 1
            traceback.print_exc()
    if deadline.expired:  # however what ran passed the timeout on (Beam wraps it)
        raise subprocess.TimeoutExpired(["python", "-m", "beam_caption", *argv], timeout,
                                        stdout.getvalue(), captured.getvalue()) from crash
    return returncode, stdout.getvalue(), captured.getvalue()


@contextlib.contextmanager
def _environment(env: dict) -> Iterator[None]:
    """os.environ with ``env`` added, and fsspec's configuration read again from it (fsspec
    reads FSSPEC_* variables once, when it is imported)."""
    import fsspec.config

    saved, conf = dict(os.environ), {key: dict(value) for key, value in fsspec.config.conf.items()}
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update({name: value for name, value in saved.items()
                           if os.environ.get(name) != value})
        fsspec.config.conf.clear()
        fsspec.config.conf.update(conf)


@contextlib.contextmanager
def _kept_logging() -> Iterator[None]:
    """No root handler while the block runs; the root's handlers and every logger's level as
    they were after it."""
    root = logging.getLogger()
    logging.getLogger("beam_caption")  # made now, so that -v's level on it is undone
    handlers, levels = root.handlers[:], _logger_levels()
    disabled = logging.root.manager.disable
    root.handlers.clear()
    try:
        yield
    finally:
        for handler in root.handlers[:]:  # the ones the CLI made
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = handlers
        for logger, level in levels.items():
            logger.setLevel(level)
        logging.disable(disabled)


@contextlib.contextmanager
def _kept_beam_options() -> Iterator[None]:
    """Beam's process-wide options (the launcher gives FileSystems the job's) as they were
    after the block; none when the block imported Beam (``estimate`` and ``report`` do not)."""
    if "apache_beam" in sys.modules:
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.value_provider import RuntimeValueProvider

        saved = FileSystems._pipeline_options, RuntimeValueProvider.runtime_options
    else:
        saved = None, None
    try:
        yield
    finally:
        if "apache_beam" in sys.modules:
            from apache_beam.io.filesystems import FileSystems
            from apache_beam.options.value_provider import RuntimeValueProvider

            FileSystems._pipeline_options, RuntimeValueProvider.runtime_options = saved


def _logger_levels() -> dict[logging.Logger, int]:
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict
                                      .values() if isinstance(logger, logging.Logger))]
    return {logger: logger.level for logger in loggers}


class _Deadline:
    """subprocess.TimeoutExpired raised in the main thread after ``timeout`` seconds of the
    block (a SIGALRM timer), as subprocess.run raises it for a process that runs too long."""

    def __init__(self, timeout: float, argv: list[str]):
        self._timeout, self._argv = timeout, argv
        self._previous = None
        self.expired = False

    def _expire(self, signum, frame):
        self.expired = True
        raise subprocess.TimeoutExpired(["python", "-m", "beam_caption", *self._argv],
                                        self._timeout)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self._timeout)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


BUCKET = "captions-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], log_path: Path, port: int) -> subprocess.Popen:
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 with a bucket, one for the session; the environment
    that points gcsfs and Beam's GCS filesystem at it. Beam asks google-auth for credentials
    (and retries for ~30 s when there are none): a user credentials file with an unexpired
    token answers at once and is never refreshed, so nothing leaves the machine."""
    emulator = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    if emulator is None:
        pytest.skip("gcp-storage-emulator is not installed (the test extra has it)")
    root = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    process = _start([emulator, "start", "--host", "127.0.0.1", "--port", str(port),
                      "--in-memory", "--default-bucket", BUCKET],
                     root / "gcp-storage-emulator.log", port)
    credentials = root / "credentials.json"
    credentials.write_text(json.dumps({
        "type": "authorized_user", "client_id": "test", "client_secret": "test",
        "refresh_token": "test", "token": "test-token", "expiry": "2099-01-01T00:00:00Z"}))
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
               "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon"}
    finally:
        _stop(process)


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):
    """The session's GCS emulator: ("gs", its environment, a gcsfs filesystem on it)."""
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # this process's gcsfs too
    yield "gs", gcs_emulator, fsspec.filesystem(
        "gcs", endpoint_url=gcs_emulator["STORAGE_EMULATOR_HOST"], token="anon")


@pytest.fixture(scope="session")
def s3_emulator(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket, one for the session; AWS_ENDPOINT_URL
    points s3fs and Beam's S3 filesystem at it.

    Beam's S3 filesystem makes a boto3 session per operation, and each parses botocore's
    JSON models again (~0.3 s, ~80 times a job): the sessions share one model loader here,
    as one session's clients do, so the job takes seconds, with the same requests."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("moto[server] is not installed (the test extra has it)")
    import botocore.loaders
    import botocore.session

    port = _free_port()
    process = _start([server, "-H", "127.0.0.1", "-p", str(port)],
                     tmp_path_factory.mktemp("s3") / "moto.log", port)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader",
                      functools.cache(botocore.loaders.create_loader))
        try:
            fsspec.filesystem("s3", endpoint_url=env["AWS_ENDPOINT_URL"], key="test",
                              secret="test").mkdir(BUCKET)
            yield env
        finally:
            _stop(process)


@pytest.fixture
def s3(s3_emulator):
    """The session's S3 emulator: ("s3", its environment, an s3fs filesystem on it)."""
    return "s3", s3_emulator, fsspec.filesystem(
        "s3", endpoint_url=s3_emulator["AWS_ENDPOINT_URL"], key="test", secret="test")


@pytest.fixture
def dataset_factory(tmp_path):
    return lambda n, **kw: make_dataset(tmp_path / "data", n, **kw)


def runtime_config(api_url, image_root, max_concurrency=8, **overrides) -> WorkerConfig:
    """A worker WorkerConfig for in-process tests of the caption runtime."""
    return WorkerConfig(
        client=ClientSettings(api_url=str(api_url), model="fake-vlm",
                              max_concurrency=max_concurrency),
        prompts=PromptSettings(system_prompt=None), images=ImageSettings(),
        image_root=str(image_root), **overrides)
