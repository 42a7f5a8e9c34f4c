"""A local stand-in for the Hugging Face Hub and for plain download URLs, so tests need no network.

Serves what ``huggingface_hub.hf_hub_download`` asks for, ``{endpoint}/{repo_id}/resolve/{revision}/
{filename}`` (HEAD and GET), the way the Hub serves LFS files: a 302 to a CDN host carrying
``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size``; the CDN is the same server reached as
``localhost`` instead of ``127.0.0.1``, a different host for huggingface_hub. Unknown repos get 401
``RepoNotFound`` and missing files 404 ``EntryNotFound``, like the Hub. Plain files live at any other
path. GETs honour ``Range: bytes=N-``, except for paths in ``ignore_range`` (answered 200 with the
whole file, as some servers do); a path in ``cut`` gets its body cut off half-way (the full
``Content-Length`` is sent, then half the bytes, then the connection closes).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class HubServer:
    """Start with ``with HubServer() as server:``; ``server.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.ignore_range: set[str] = set()
        self.requests: list[Request] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_hub_file(self, repo_id: str, filename: str, content: bytes) -> None:
        """Publish ``content`` as ``filename`` in hub repo ``repo_id`` (revision main)."""
        self.repos.setdefault(repo_id, {})[filename] = content

    def add_repo(self, repo_id: str) -> None:
        """Create an empty hub repo, so that its missing files get 404 EntryNotFound."""
        self.repos.setdefault(repo_id, {})

    def add_file(self, path: str, content: bytes) -> str:
        """Serve ``content`` at ``path``; returns its URL."""
        self.files[path] = content
        return self.url + path

    def cdn_path(self, content: bytes) -> str:
        return f"/cdn/{hashlib.sha256(content).hexdigest()}"


class _Handler(BaseHTTPRequestHandler):
    server_version = "hubserver/1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        path = unquote(self.path.split("?", 1)[0])
        hub.requests.append(
            Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        match = _RESOLVE.fullmatch(path)
        if match:
            self._resolve(hub, *match.groups())
            return
        if path.startswith("/cdn/"):
            blobs = {
                hub.cdn_path(content): content for files in hub.repos.values() for content in files.values()
            }
            if path in blobs:
                self._content(hub, path, blobs[path], head)
                return
        if path in hub.files:
            self._content(hub, path, hub.files[path], head)
            return
        self._empty(404)

    def _resolve(self, hub: HubServer, repo_id: str, revision: str, filename: str) -> None:
        if repo_id not in hub.repos:
            self._empty(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return
        if revision not in ("main", COMMIT):
            self._empty(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return
        content = hub.repos[repo_id].get(filename)
        if content is None:
            self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            return
        sha256 = hashlib.sha256(content).hexdigest()
        self._empty(
            302,
            {
                "Location": f"http://localhost:{hub.port}{hub.cdn_path(content)}",
                "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(content)),
                "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
            },
        )

    def _content(self, hub: HubServer, path: str, content: bytes, head: bool) -> None:
        start = 0
        status = 200
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        requested = self.headers.get("Range")
        if requested and path not in hub.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", requested.strip())
            start = int(match.group(1)) if match else 0
            if start >= len(content):
                self._empty(416, {"Content-Range": f"bytes */{len(content)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body = content[start:]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if path in hub.cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
