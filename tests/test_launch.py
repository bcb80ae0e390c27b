"""What a cluster run needs from the launcher and workers: absolute local paths, the offline
local runner, the key from a file or Secret Manager, and a worker without the key stopping the
job."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from conftest import TEST_RUNNER, run_cli, runtime_config

from beam_caption.cli.flags import LOCAL_RUNNER, CaptionOptions, prepare_launch
from beam_caption.core.api_keys import KeySource, read_key_file
from beam_caption.core.engine import CaptionRuntime
from beam_caption.core.errors import JobStopped, UsageError
from beam_caption.testing.fake_vlm import FakeVLMConfig, FakeVLMServer

SAMPLE = Path(__file__).parents[1] / "beam_caption" / "sample_data" / "sample_data.json"


def test_local_path_flags_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = PipelineOptions(["--output", "out", "--image_root", "../images",
                               "--cache_dir", "gs://bucket/cache", "--runner", "PortableRunner"])
    prepare_launch(options)
    flags = options.view_as(CaptionOptions)
    assert flags.output == str(tmp_path / "out")
    assert flags.image_root == os.path.normpath(tmp_path / ".." / "images")
    assert flags.cache_dir == "gs://bucket/cache"
    assert options.view_as(StandardOptions).runner == "PortableRunner"  # a named runner is kept
    # what workers receive is the absolute form, not the launcher's working directory
    assert options.get_all_options()["output"] == str(tmp_path / "out")


def test_no_runner_named_means_the_offline_local_runner(tmp_path):
    options = PipelineOptions(["--output", str(tmp_path)])
    prepare_launch(options)
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER == "FnApiRunner"


def test_a_worker_without_the_key_the_launcher_had_stops_the_job(tmp_path, monkeypatch):
    for name in ("DF_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = runtime_config("http://unused.invalid/v1", tmp_path,
                            api_key=KeySource(required=True))
    with pytest.raises(JobStopped, match="a worker found no API key in the environment "
                                         "variable DF_API_KEY or OPENAI_API_KEY"):
        CaptionRuntime(config)
    missing = runtime_config("http://unused.invalid/v1", tmp_path,
                             api_key=KeySource(file=str(tmp_path / "gone"), required=True))
    with pytest.raises(JobStopped, match=r"could not read the API key: --api_key_file .*gone"):
        CaptionRuntime(missing)


def test_key_file_is_read_stripped_and_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DF_API_KEY", "from-env")
    (tmp_path / "key").write_text("sk-from-file\n")
    assert KeySource(file=str(tmp_path / "key")).resolve() == "sk-from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="holds no key"):
        read_key_file(str(tmp_path / "empty"))


def test_cli_with_a_relative_key_file_captions_and_never_reports_the_key(dataset_factory,
                                                                          tmp_path):
    data = dataset_factory(3, files=1)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("sk-mounted-secret-42\n")
    env = {name: "" for name in ("DF_API_KEY", "OPENAI_API_KEY")}
    with FakeVLMServer(FakeVLMConfig(api_key="sk-mounted-secret-42")) as server:
        result = run_cli([*TEST_RUNNER, "--input", data.manifests[0], "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", str(data.root),
                          "--api_key_file", "secret/key"], tmp_path / "out", env=env,
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.captions) == 3 and not result.failures
    assert result.summary["options"]["api_key_file"] == str(tmp_path / "secret" / "key")
    assert "sk-mounted-secret-42" not in (tmp_path / "out" / "summary.json").read_text()


def test_an_unreadable_key_file_is_refused_at_launch_before_any_request(tmp_path):
    from beam_caption.cli.launcher import run

    with FakeVLMServer() as server:
        with pytest.raises(UsageError, match=r"--api_key_file .*missing cannot be read"):
            run([*TEST_RUNNER, "--input", str(SAMPLE), "--output", str(tmp_path / "out"),
                 "--api_url", server.url, "--model", "fake-vlm",
                 "--api_key_file", str(tmp_path / "missing")])
        assert server.stats()["requests"] == 0


SECRET = "projects/my-project/secrets/openai/versions/latest"


class _FakeSecretManager:
    """google.cloud.secretmanager as the tests need it: versions by name, with their reads."""

    def __init__(self, versions: dict[str, bytes]):
        self.versions, self.reads = versions, []
        manager = self

        class SecretManagerServiceClient:
            def access_secret_version(self, name, timeout):
                manager.reads.append(name)
                if name not in manager.versions:
                    raise PermissionError(f"Permission 'secretmanager.versions.access' denied "
                                          f"for resource '{name}'")
                payload = types.SimpleNamespace(data=manager.versions[name])
                return types.SimpleNamespace(payload=payload)

        self.module = types.SimpleNamespace(SecretManagerServiceClient=SecretManagerServiceClient)


@pytest.fixture
def secret_manager(monkeypatch):
    fake = _FakeSecretManager({SECRET: b"sk-from-secret-manager\n"})
    monkeypatch.setitem(sys.modules, "google.cloud.secretmanager", fake.module)
    import google.cloud
    monkeypatch.setattr(google.cloud, "secretmanager", fake.module, raising=False)
    return fake


def test_a_secret_version_is_read_stripped_and_errors_name_it_never_its_content(
        secret_manager):
    source = KeySource.for_launch(None, None, SECRET)
    assert source.required  # workers must find it, though the launcher has not read it yet
    assert source.resolve() == "sk-from-secret-manager"
    assert "Secret Manager version " + SECRET in source.describe()
    other = "projects/my-project/secrets/other/versions/2"
    with pytest.raises(UsageError, match=r"--api_key_secret .*other/versions/2 cannot be read: "
                                         r"PermissionError: Permission 'secretmanager"):
        KeySource(secret=other).resolve()
    secret_manager.versions[other] = b"  \n"
    with pytest.raises(UsageError, match="holds no key"):
        KeySource(secret=other).resolve()


def test_a_secret_needs_the_gcp_extra_and_a_version_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.secretmanager", None)  # not installed
    with pytest.raises(UsageError, match=r"pip install 'beam_caption\[gcp\]'"):
        KeySource(secret=SECRET).resolve()
    from beam_caption.cli.launcher import run

    for flags, message in (
            (["--api_key_secret", "projects/p/secrets/openai"], "not a secret version name"),
            (["--api_key_secret", SECRET, "--api_key_file", "key"], "one of --api_key_file")):
        with pytest.raises(UsageError, match=message):
            run(["--input", str(SAMPLE), "--output", "unused", "--api_url",
                 "http://unused.invalid/v1", "--model", "m", *flags])


def test_workers_read_the_key_from_secret_manager(secret_manager, dataset_factory, tmp_path,
                                                  monkeypatch):
    from beam_caption.cli.launcher import run

    for name in ("DF_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    data = dataset_factory(4, files=1)
    with FakeVLMServer(FakeVLMConfig(api_key="sk-from-secret-manager")) as server:
        summary = run([*TEST_RUNNER, "--input", data.manifests[0], "--output",
                       str(tmp_path / "out"), "--api_url", server.url, "--model", "fake-vlm",
                       "--image_root", str(data.root), "--api_key_secret", SECRET])
    assert summary["captioned"] == 4 and summary["options"]["api_key_secret"] == SECRET
    # read by the launcher (preflight) and by the worker, never from the options
    assert len(secret_manager.reads) >= 2
    assert "sk-from-secret-manager" not in (tmp_path / "out" / "summary.json").read_text()
