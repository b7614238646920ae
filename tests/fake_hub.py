"""A Hugging Face Hub stand-in on 127.0.0.1 that speaks the file protocol hf_hub_download uses.

``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` answer with the headers the real
Hub sends (``X-Repo-Commit``, ``ETag``, ``Content-Length``) or with its error codes
(``X-Error-Code``: ``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
``EntryNotFound``), so huggingface_hub's own code maps them to its exceptions.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote


@dataclass
class FakeRepo:
    files: Dict[str, bytes]
    commit: str = "a" * 40
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit, besides main
    gated: bool = False
    token: Optional[str] = None  # the only token granted access, when gated

    def commit_for(self, revision: str) -> Optional[str]:
        if revision in ("main", self.commit):
            return self.commit
        if revision in self.branches.values():
            return revision
        return self.branches.get(revision)


class FakeHub:
    def __init__(self) -> None:
        self.repos: Dict[str, FakeRepo] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []  # (method, path, authorization)
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, method: str, path: str, auth: Optional[str]):
        self.requests.append((method, path, auth))
        parts = unquote(path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if repo.gated and auth != f"Bearer {repo.token}":
            status = 401 if auth is None else 403
            return status, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"}, b""
        commit = repo.commit_for(revision)
        if commit is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        if filename not in repo.files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b""
        body = repo.files[filename]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": '"' + hashlib.sha256(body).hexdigest() + '"',
            "Content-Length": str(len(body)),
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, body

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self, send_body: bool) -> None:
                status, headers, body = hub._answer(self.command, self.path, self.headers.get("authorization"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", "0")
                self.end_headers()
                if send_body and status == 200:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802
                self._respond(send_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._respond(send_body=True)

            def log_message(self, *args) -> None:
                pass

        return Handler
