"""Images named by http(s) URL: fetched behind a guard against server-side request forgery,
within explicit timeouts, with typed errors.

A manifest is untrusted input, and its URLs are fetched from inside the job's network (where a
cloud metadata server or internal services answer). ``UrlGuard`` refuses every address that is
not global unicast: loopback, private, link-local, shared (CGNAT), multicast, reserved and
unspecified ones, also when embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64). It decides on
the addresses a connection actually goes to: the host is resolved once, every answer is
checked (one refused answer refuses the host: a DNS answer mixing in an internal address is an
attack), and the socket connects to a checked address, so a second resolution cannot rebind
it. Redirects are followed by hand, each hop checked the same way. ``allow_private`` (the
``--allow_private_urls`` flag) turns the address check off, for images on an internal server.

Errors say what happened (``image_not_found``, ``image_forbidden``, ``image_unavailable``,
``image_too_large``, ``image_timeout``, ``image_url_refused``, ...), are marked retryable when
a later attempt can succeed, and never show a URL's credentials, query or fragment.
"""

from __future__ import annotations

import base64
import functools
import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable

from beam_caption.core.errors import CaptionError
from beam_caption.core.redact import redact_url

MAX_REDIRECTS = 5
CHUNK_BYTES = 256 * 1024
USER_AGENT = "beam_caption (image fetch)"
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NOT_FOUND = (404, 410)
_FORBIDDEN = (401, 403, 407, 451)
_TRANSIENT = (408, 425, 429, 500, 502, 503, 504)
_REDIRECTS = (301, 302, 303, 307, 308)

_HTTP_URL = re.compile(r"^https?://", re.IGNORECASE)

# (host, port) -> the addresses a name resolves to (strings)
Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_http_url(url: str) -> bool:
    """Whether ``url`` is fetched over http(s) (by ``fetch``, one file, no glob)."""
    return bool(_HTTP_URL.match(url))


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (TCP)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def address_refusal(address: str | IPAddress) -> str | None:
    """Why a connection to ``address`` is refused (e.g. ``"loopback"``); None when it is a
    global unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = address_refusal(embedded)
            return f"{reason}, inside {ip}" if reason else None
    checks = (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("shared address space (CGNAT)", ip in _CGNAT), ("private", ip.is_private),
              ("reserved", ip.is_reserved), ("not globally routable", not ip.is_global))
    return next((name for name, refused in checks if refused), None)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class UrlGuard:
    """Decides which addresses image fetches may connect to (see the module)."""

    def __init__(self, allow_private: bool = False, resolver: Resolver = system_resolver,
                 refusal: Callable[[str], str | None] = address_refusal):
        self.allow_private = allow_private
        self._resolver, self._refusal = resolver, refusal

    def addresses(self, host: str, port: int, shown: str) -> list[str]:
        """The addresses to connect to for ``host``, every one checked; CaptionError
        ``image_url_refused`` when any is refused, ``image_host_not_found`` when none."""
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            found = [str(literal)]
        else:
            try:
                found = list(dict.fromkeys(self._resolver(host, port)))
            except (OSError, UnicodeError) as exc:
                raise CaptionError("image", "image_host_not_found",
                                   f"{shown}: {host} could not be resolved: "
                                   f"{type(exc).__name__}: {exc}", retryable=True) from None
            if not found:
                raise CaptionError("image", "image_host_not_found",
                                   f"{shown}: {host} resolved to no address", retryable=True)
        if not self.allow_private:
            for address in found:
                reason = self._refusal(address)
                if reason:
                    raise CaptionError(
                        "image", "image_url_refused",
                        f"{shown}: {host} is {address}, a {reason} address: image URLs must "
                        "reach public addresses (--allow_private_urls allows others)")
        return found


class _GuardedHTTP(http.client.HTTPConnection):
    """An HTTP connection that connects only to the guard's checked addresses."""

    def __init__(self, host: str, port: int, timeout: float, guard: UrlGuard, shown: str):
        super().__init__(host, port, timeout=timeout)
        self._guard, self._shown = guard, shown

    def _guarded_socket(self) -> socket.socket:
        error: OSError | None = None
        for address in self._guard.addresses(self.host, self.port, self._shown):
            try:
                return socket.create_connection((address, self.port), self.timeout)
            except OSError as exc:
                error = exc
        assert error is not None  # addresses() returns at least one
        raise error

    def connect(self) -> None:
        self.sock = self._guarded_socket()


class _GuardedHTTPS(_GuardedHTTP):
    """The same over TLS, verified against the URL's host name."""

    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        self.sock = _tls_context().wrap_socket(self._guarded_socket(),
                                               server_hostname=self.host)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process, made on first use (loading the CAs takes time)."""
    return ssl.create_default_context()


def fetch(url: str, max_bytes: int, timeout: float, guard: UrlGuard) -> bytes:
    """The body at an http(s) ``url``, following up to MAX_REDIRECTS redirects; at most
    ``max_bytes`` (more is ``image_too_large``), all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        shown = redact_url(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CaptionError("image", "image_url_refused",
                               f"{shown}: only http and https URLs with a host are fetched")
        connection_class = _GuardedHTTPS if parts.scheme == "https" else _GuardedHTTP
        connection = None
        try:
            connection = connection_class(
                parts.hostname, parts.port or connection_class.default_port,
                _remaining(deadline, shown), guard, shown)
            answer = _get(connection, parts, deadline, shown, max_bytes)
            if isinstance(answer, bytes):
                return answer
        except TimeoutError:  # socket.timeout is TimeoutError
            raise CaptionError("image", "image_timeout",
                               f"{shown}: no complete answer within {timeout:g} s "
                               "(--image_timeout)", retryable=True) from None
        except ssl.SSLError as exc:  # before OSError: a certificate will not fix itself
            raise CaptionError("image", "image_tls_error",
                               f"{shown}: TLS failed: {exc.reason or type(exc).__name__}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CaptionError("image", "image_unavailable",
                               f"{shown}: {type(exc).__name__}: {exc}", retryable=True) from None
        finally:
            if connection is not None:
                connection.close()
        url = urllib.parse.urljoin(url, answer)
    raise CaptionError("image", "image_too_many_redirects",
                       f"{shown}: more than {MAX_REDIRECTS} redirects")


def _get(connection: _GuardedHTTP, parts: urllib.parse.SplitResult, deadline: float,
         shown: str, max_bytes: int) -> bytes | str:
    """One GET: the body, or the Location a redirect points to."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*, */*;q=0.5"}
    if parts.username is not None:
        user_password = f"{urllib.parse.unquote(parts.username)}:" \
                        f"{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_password.encode()).decode()
    connection.request("GET", target, headers=headers)
    response = connection.getresponse()
    status = response.status
    if status in _REDIRECTS:
        location = response.getheader("Location")
        if not location:
            raise CaptionError("image", "image_http_error",
                               f"{shown}: HTTP {status} redirect without a Location")
        return location
    if status >= 400:
        raise _status_error(status, response.reason, shown)
    if status != 200:
        raise CaptionError("image", "image_http_error", f"{shown}: HTTP {status} {response.reason}")
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise CaptionError("image", "image_too_large",
                           f"{shown} is {length} bytes, over the limit of {max_bytes} bytes")
    chunks, size = [], 0
    while size <= max_bytes:
        if connection.sock is not None:
            connection.sock.settimeout(_remaining(deadline, shown))
        chunk = response.read(min(CHUNK_BYTES, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise CaptionError("image", "image_too_large",
                           f"{shown} is more than {max_bytes} bytes, over the limit")
    return b"".join(chunks)


def _status_error(status: int, reason: str, shown: str) -> CaptionError:
    text = f"{shown}: HTTP {status} {reason}".rstrip()
    if status in _NOT_FOUND:
        return CaptionError("image", "image_not_found", text)
    if status in _FORBIDDEN:
        return CaptionError("image", "image_forbidden", text)
    if status in _TRANSIENT or status >= 500:
        return CaptionError("image", "image_unavailable", text, retryable=True)
    return CaptionError("image", "image_http_error", text)


def _remaining(deadline: float, shown: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(shown)
    return left
