"""Images over http(s): the address guard (decided on literals and a fake resolver, never by
connecting to such addresses), typed errors, redirects, size caps, retries, and CLI runs against
a loopback image server with and without --allow_private_urls."""

from __future__ import annotations

import http.server
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from conftest import TEST_RUNNER, run_cli

from beam_caption.core.errors import CaptionError
from beam_caption.core.http_images import UrlGuard, address_refusal, fetch
from beam_caption.testing import FakeVLMServer


@pytest.mark.parametrize("address, reason", [
    ("8.8.8.8", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("2002:0808:0808::", None), ("64:ff9b::808:808", None),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("fc00::1", "private"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("100.64.0.1", "shared address space (CGNAT)"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "private"),
    ("198.18.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback, inside ::ffff:7f00:1"),  # IPv4-mapped
    ("::ffff:169.254.169.254", "link-local, inside ::ffff:a9fe:a9fe"),
    ("2002:a9fe:a9fe::", "link-local, inside 2002:a9fe:a9fe::"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "link-local, inside 64:ff9b::a9fe:a9fe"),  # NAT64
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
     "private, inside 2001:0:4136:e378:8000:63bf:3fff:fdd2"),
])
def test_only_global_unicast_addresses_are_allowed(address, reason):
    assert address_refusal(address) == reason


def _resolver(answers: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"no such host {host}")
        return answers[host]
    return resolve


def test_the_guard_checks_every_dns_answer_and_literal_hosts():
    guard = UrlGuard(resolver=_resolver({
        "images.example": ["93.184.216.34", "2606:2800:220:1::"],
        "rebind.example": ["93.184.216.34", "10.0.0.7"],
        "metadata.example": ["169.254.169.254"]}))
    assert guard.addresses("images.example", 443, "u") == ["93.184.216.34", "2606:2800:220:1::"]
    for host, address in (("rebind.example", "10.0.0.7"), ("metadata.example", "169.254.169.254"),
                          ("127.0.0.1", "127.0.0.1"), ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1")):
        with pytest.raises(CaptionError) as info:
            guard.addresses(host, 80, "http://shown/x.png")
        assert (info.value.type, info.value.retryable) == ("image_url_refused", False)
        assert address in info.value.message and "--allow_private_urls" in info.value.message
    with pytest.raises(CaptionError) as info:
        guard.addresses("nowhere.example", 80, "u")
    assert (info.value.type, info.value.retryable) == ("image_host_not_found", True)
    allowing = UrlGuard(allow_private=True, resolver=_resolver({"db.internal": ["10.0.0.7"]}))
    assert allowing.addresses("db.internal", 80, "u") == ["10.0.0.7"]


class _ImageHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; some paths answer with a status, a redirect, or fail a few times."""

    failures_left: dict[str, int] = {}

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/status/"):
            self.send_error(int(path.split("/")[2]))
        elif path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", path.removeprefix("/redirect"))
            self.end_headers()
        elif path.startswith("/to/"):  # /to/HOST/PATH: redirect to another host
            self.send_response(302)
            host, _, rest = path.removeprefix("/to/").partition("/")
            self.send_header("Location", f"http://{host}:{self.server.server_port}/{rest}")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.failures_left.get(path, 0) > 0:
            self.failures_left[path] -= 1
            self.send_error(503)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def image_server(directory: Path, failures: dict[str, int] | None = None):
    """Serves ``directory`` on loopback; ``failures``: path -> how many 503s it answers first."""
    handler = type("Handler", (_ImageHandler,), {"failures_left": dict(failures or {})})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


LOOPBACK = UrlGuard(allow_private=True)


def _fetch_error(url: str, guard: UrlGuard = LOOPBACK, max_bytes: int = 2**20) -> CaptionError:
    with pytest.raises(CaptionError) as info:
        fetch(url, max_bytes, 5.0, guard)
    return info.value


def test_fetch_reads_follows_redirects_and_types_each_failure(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 1000)
    with image_server(tmp_path) as root:
        assert fetch(f"{root}/a.png?sig=s3cret", 2**20, 5.0, LOOPBACK) == b"x" * 1000
        assert fetch(f"{root}/redirect/a.png", 2**20, 5.0, LOOPBACK) == b"x" * 1000
        for path, type_, retryable in (("/status/404", "image_not_found", False),
                                       ("/status/410", "image_not_found", False),
                                       ("/status/403", "image_forbidden", False),
                                       ("/status/401", "image_forbidden", False),
                                       ("/status/503", "image_unavailable", True),
                                       ("/status/429", "image_unavailable", True),
                                       ("/status/500", "image_unavailable", True),
                                       ("/status/418", "image_http_error", False),
                                       ("/loop", "image_too_many_redirects", False)):
            error = _fetch_error(f"{root}{path}?sig=s3cret")
            assert (error.type, error.retryable) == (type_, retryable), path
            assert "s3cret" not in error.message
        too_large = _fetch_error(f"{root}/a.png", max_bytes=999)
        assert too_large.type == "image_too_large" and "1000 bytes" in too_large.message
    closed = _fetch_error(root + "/a.png")  # the server is gone: connection refused
    assert (closed.type, closed.retryable) == ("image_unavailable", True)


def test_every_redirect_hop_is_checked_before_connecting(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    # A policy that allows only 127.0.0.1: a redirect to 127.0.0.2 must be refused before any
    # connection (nothing listens there; a connection attempt would be image_unavailable).
    only_first = UrlGuard(refusal=lambda address: None if address == "127.0.0.1" else "other")
    with image_server(tmp_path) as root:
        assert fetch(f"{root}/a.png", 100, 5.0, only_first) == b"png"
        error = _fetch_error(f"{root}/to/127.0.0.2/a.png?sig=s3cret", only_first)
    assert error.type == "image_url_refused" and "127.0.0.2" in error.message
    assert "s3cret" not in error.message


def test_the_default_guard_refuses_loopback_without_connecting(tmp_path):
    error = _fetch_error("http://user:pw@127.0.0.1:9/a.png?sig=s3cret", UrlGuard())
    assert (error.type, error.retryable) == ("image_url_refused", False)
    assert "loopback" in error.message
    assert "s3cret" not in error.message and "pw" not in error.message
    assert _fetch_error("ftp://example.com/a.png", UrlGuard()).type == "image_url_refused"


def _args(data, server, root, *extra):
    return [*TEST_RUNNER, "--input", ",".join(data.manifests), "--api_url", server.url,
            "--model", "fake-vlm", "--image_root", root, *extra]


def test_cli_captions_http_images_only_with_allow_private_urls(dataset_factory, tmp_path):
    data = dataset_factory(6, files=1)
    with image_server(data.root) as root, FakeVLMServer() as server:
        allowed = run_cli(_args(data, server, root, "--allow_private_urls"),
                          tmp_path / "allowed")
        refused = run_cli(_args(data, server, root), tmp_path / "refused")
        sent_for_refused = server.stats()["requests"] - 6
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert {r["id"]: r["caption"] for r in allowed.captions} == data.expected
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert not refused.captions and sent_for_refused == 0
    assert {f["error"]["type"] for f in refused.failures} == {"image_url_refused"}
    assert all("loopback" in f["error"]["message"] for f in refused.failures)


def test_transient_image_failures_are_retried(dataset_factory, tmp_path):
    data = dataset_factory(3, files=1)
    failures = {"/images/img00001.png": 2, "/images/img00002.png": 9}
    with image_server(data.root, failures) as root, FakeVLMServer() as server:
        result = run_cli(_args(data, server, root, "--allow_private_urls", "--image_retries", "2"),
                         tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["id"] for r in result.captions) == ["r0", "r1"]  # r1 on its third read
    [failure] = result.failures
    assert failure["record"]["id"] == "r2"
    assert failure["error"]["type"] == "image_unavailable" and failure["error"]["retryable"]
    assert "(read 3 times)" in failure["error"]["message"]


def test_a_signed_manifest_url_leaves_its_query_in_no_file_and_no_log_line(dataset_factory,
                                                                            tmp_path):
    data = dataset_factory(4, files=1, bad_records=True)
    manifest = Path(data.manifests[0]).name
    with image_server(data.root) as root, FakeVLMServer() as server:
        signed = f"{root}/{manifest}?X-Goog-Signature=s3cret-sig&X-Goog-Credential=s3cret-cred"
        result = run_cli([*TEST_RUNNER, "--input", signed, "--api_url", server.url,
                          "--model", "fake-vlm", "--image_root", root, "--allow_private_urls",
                          "--checkpoint_interval", "0.1"], tmp_path / "out")
        missing = run_cli([*TEST_RUNNER, "--input", f"{root}/absent.jsonl?sig=s3cret",
                           "--api_url", server.url, "--model", "fake-vlm"], tmp_path / "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["id"]: r["caption"] for r in result.captions} == data.expected
    assert {f["record"]["id"] for f in result.failures} == set(data.bad)
    assert result.captions[0]["caption_meta"]["key"].startswith(
        f"{root}/{manifest}?REDACTED#")
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert written and not [path for path in written if "s3cret" in path.read_text()]
    assert "s3cret" not in result.stdout + result.stderr
    assert missing.returncode == 2 and "no manifest file at" in missing.stderr
    assert "s3cret" not in missing.stderr and "glob" not in missing.stderr
