"""Download a zip over https with ``requests``: a total deadline, a byte cap, an optional sha256 pin.

* The deadline bounds the whole transfer. ``requests``' ``timeout`` applies to each read, so a server
  that sends a byte every few seconds would never time out: the transfer runs in a worker thread
  that the caller stops waiting for at the deadline (its socket is then shut down).
* Redirects are followed by hand (at most :data:`MAX_REDIRECTS`), each hop checked: never from
  https down to http, and plain http only while the file is pinned by its sha256.
* An HTML page (a login or error page where a zip was expected) is reported as such, naming the URL.
* No message names the URL with its credentials or query values (see :func:`~cxr.data.sources.redact_url`);
  errors from ``requests`` quote the URL, so their innermost cause is reported instead.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from cxr.data.sources import Source, SourceLimits, ensure_free_space, human_size, redact_url, url_secrets
from cxr.errors import PipelineError, first_line

CONNECT_TIMEOUT_S = 30
STALL_TIMEOUT_S = 120  # one read that brings nothing for this long ends the download before the deadline
MAX_REDIRECTS = 10
CHUNK_BYTES = 2**20
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


class _Cancelled(Exception):
    """The caller gave up waiting (deadline); the worker stops at its next read."""


def download_url(source: Source, target: Path, limits: SourceLimits) -> Path:
    """Download ``source.url`` into ``target`` within ``limits.deadline_s`` seconds; returns ``target``."""
    transfer = _Transfer(source, target, limits)
    worker = threading.Thread(target=transfer.run, name="cxr-download", daemon=True)
    worker.start()
    worker.join(limits.deadline_s)
    if worker.is_alive():
        transfer.cancel()
        worker.join(5)
        raise PipelineError(f"cannot download {source.shown}: not complete after {limits.deadline_s:g} s (the server is "
                            f"too slow or stalled); download it by hand and point {source.key} at the .zip")
    if transfer.error is not None:
        raise transfer.error
    return target


class _Transfer:
    """One download, run in a worker thread; ``error`` holds what ended it badly."""

    def __init__(self, source: Source, target: Path, limits: SourceLimits) -> None:
        self.source, self.target, self.limits = source, target, limits
        self.shown = source.shown
        self.cancelled = threading.Event()
        self.response: requests.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fetch()
        except _Cancelled:
            pass
        except BaseException as err:  # handed to the caller's thread, which raises it
            self.error = self._worded(err)

    def cancel(self) -> None:
        self.cancelled.set()
        response = self.response
        if response is not None:
            try:
                response.raw.shutdown()  # unblocks a read waiting in the worker
            except (ValueError, RuntimeError, OSError):
                pass

    def _worded(self, err: BaseException) -> BaseException:
        """``err`` as a one-line PipelineError naming the redacted URL (other exceptions pass unchanged)."""
        if isinstance(err, PipelineError):
            return err
        if isinstance(err, requests.exceptions.SSLError):
            return self._error(f"the TLS certificate check failed ({_cause(err, self.source.url)})")
        if isinstance(err, requests.exceptions.Timeout):
            return self._error(f"no answer for {STALL_TIMEOUT_S} s (connection or read timed out)")
        if isinstance(err, requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError
                      | http.client.IncompleteRead):
            return self._error("the connection closed before the whole file arrived")
        if isinstance(err, requests.exceptions.RequestException | urllib3.exceptions.HTTPError | http.client.HTTPException):
            return self._error(_cause(err, self.source.url))
        if isinstance(err, OSError):  # writing the download (requests' own errors are OSErrors too, handled above)
            folder = next(p for p in self.target.parents if not p.name.startswith("."))  # not the hidden work folder
            return self._error(f"cannot write it into {folder} ({err.strerror or first_line(err)})")
        return err

    def _error(self, problem: str) -> PipelineError:
        return PipelineError(f"cannot download {self.shown}: {problem}")

    def _fetch(self) -> None:
        with requests.Session() as session:
            session.headers["Accept-Encoding"] = "identity"  # the zip as stored: no decoding, no gzip bomb
            with self._follow_redirects(session) as response:
                self._check_headers(response)
                digest = self._stream(response)
        self._check_body(digest)

    def _follow_redirects(self, session: requests.Session) -> requests.Response:
        url = self.source.url
        for _ in range(MAX_REDIRECTS + 1):
            if self.cancelled.is_set():
                raise _Cancelled
            response = session.get(url, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT_S, STALL_TIMEOUT_S))
            self.response = response
            if not response.is_redirect:
                return response
            following = urljoin(url, response.headers["location"])
            response.close()
            self._check_hop(url, following)
            url = following
        raise self._error(f"more than {MAX_REDIRECTS} redirects")

    def _check_hop(self, current: str, following: str) -> None:
        scheme = urlsplit(following).scheme.lower()
        if scheme not in ("http", "https"):
            raise self._error(f"the server redirected to {redact_url(following)}, not an http(s) URL")
        if scheme == "http" and urlsplit(current).scheme.lower() == "https":
            raise self._error(f"the server redirected from https to plain http ({redact_url(following)}); refusing the "
                              "downgrade")
        if scheme == "http" and self.source.sha256 is None:
            raise self._error(f"the server redirected to plain http ({redact_url(following)}) and no sha256 is pinned")

    def _check_headers(self, response: requests.Response) -> None:
        if response.status_code >= 400:
            hint = " (the link needs a login: use one that downloads without it, or download by hand)" \
                if response.status_code in (401, 403) else ""
            raise self._error(f"HTTP Error {response.status_code}: {response.reason}{hint}")
        if response.headers.get("content-type", "").split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise self._html()
        length = response.headers.get("content-length", "")
        if length.isdigit():
            if int(length) > self.limits.max_bytes:
                raise self._error(f"the server announces {human_size(int(length))}, more than the "
                                  f"{human_size(self.limits.max_bytes)} allowed")
            ensure_free_space(self.target.parent, int(length), f"downloading {self.shown}")

    def _stream(self, response: requests.Response) -> hashlib._Hash:
        digest, received = hashlib.sha256(), 0
        with self.target.open("wb") as out:
            while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                if self.cancelled.is_set():
                    raise _Cancelled
                received += len(chunk)
                if received > self.limits.max_bytes:
                    raise self._error(f"more than the {human_size(self.limits.max_bytes)} allowed arrived")
                digest.update(chunk)
                out.write(chunk)
        length = response.headers.get("content-length", "")
        if length.isdigit() and received < int(length) and "content-encoding" not in response.headers:
            raise self._error(f"the connection closed with {int(length) - received} bytes still to come")
        return digest

    def _check_body(self, digest: hashlib._Hash) -> None:
        with self.target.open("rb") as downloaded:
            head = downloaded.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if head.startswith(HTML_STARTS):
            raise self._html()
        expected = self.source.sha256
        if expected is not None and digest.hexdigest() != expected:
            raise self._error(f"its sha256 is {digest.hexdigest()}, not the {expected} pinned in the URL (the file "
                              "changed on the server, or was altered on the way)")

    def _html(self) -> PipelineError:
        return self._error("the server sent an HTML page, not a zip (a login or error page? use a direct download link)")


def _cause(err: BaseException, url: str) -> str:
    """The innermost reason of a ``requests`` error, which (unlike the error itself) does not quote the URL."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        reason = getattr(current, "reason", None)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = reason if isinstance(reason, BaseException) else nested or current.__cause__ or current.__context__
    for cause in reversed(seen):
        text = getattr(cause, "verify_message", None) or (cause.strerror if isinstance(cause, OSError) else None)
        if text:
            return _scrub(str(text), url)
    return _scrub(first_line(seen[-1]).rpartition("): ")[2] or type(seen[-1]).__name__, url)


def _scrub(text: str, url: str) -> str:
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text
