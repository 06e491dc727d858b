"""A small in-memory server speaking the parts of the Hugging Face Hub API the pipeline uses.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT``: repo create, whoami, model info
(by revision), tree listing, file resolve (HEAD and GET), preupload (always "regular", so file contents
travel inline in the commit), commit (NDJSON), branch and tag creation, settings, refs and model
listing. Every token is one user's, who writes only their own namespace and the organizations where their role
allows, as on the Hub; a fine-grained token only those of them its scopes grant ``repo.write``. Faults are
injected per route so the tests can watch retries and atomicity.

Usage (``python -m tests.pipeline.hub_server`` also serves it on a fixed port for manual runs)::

    with HubServer(tokens={"hf_secret"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    card_data: dict[str, Any] = field(default_factory=dict)
    gated: bool = False
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(oid)


@dataclass
class Fault:
    pattern: re.Pattern[str]
    method: str
    status: int
    remaining: int
    delay: float = 0.0
    reset: bool = False


class HubState:
    """Repos, tokens, injected faults and a request log (paths and methods only)."""

    def __init__(self, tokens: set[str]) -> None:
        self.tokens = tokens
        # Every token is this user's; it writes its own namespace and the organizations where its role allows.
        self.user = "tester"
        self.orgs: dict[str, str] = {}
        self.token_role = "write"
        # With token_role "fineGrained": the token's scopes as the Hub's whoami shows them, {"global": [permission],
        # "scoped": [{"entity": {"type": "user" | "org" | "model", "name": ...}, "permissions": [...]}]}.
        self.fine_grained: dict[str, Any] = {"global": [], "scoped": []}
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0

    def new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}:{time.time_ns()}".encode()).hexdigest()

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], deleted: set[str], message: str) -> Commit:
        parent = repo.branches.get(branch)
        current = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            current.pop(path, None)
        current.update(files)
        commit = Commit(self.new_oid(repo.repo_id), current, message, parent)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        private: bool = False,
        gated: bool = False,
        card_data: dict[str, Any] | None = None,
    ) -> Repo:
        """Create a repo with an initial commit on main (as the Hub does); optionally commit ``files``."""
        with self.lock:
            return self.add_repo_unlocked(repo_id, files, private=private, gated=gated, card_data=card_data)

    def add_repo_unlocked(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        private: bool = False,
        gated: bool = False,
        card_data: dict[str, Any] | None = None,
    ) -> Repo:
        repo = Repo(repo_id, private, gated=gated, card_data=card_data or {})
        self.repos[repo_id] = repo
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.commit(repo, "main", {".gitattributes": attributes}, set(), "initial commit")
        if files:
            self.commit(repo, "main", files, set(), "add files")
        return repo

    def add_folder(self, repo_id: str, folder: str | Path, **kwargs: Any) -> Repo:
        base = Path(folder)
        files = {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}
        return self.add_repo(repo_id, files, **kwargs)

    def fail(
        self,
        pattern: str,
        status: int = 500,
        times: int = 1,
        method: str = "*",
        delay: float = 0.0,
        reset: bool = False,
    ) -> None:
        """Answer the next ``times`` requests whose path matches ``pattern`` with ``status`` (after ``delay``).

        With ``reset`` the connection is reset (TCP RST) instead of answered; a ``delay`` longer than the
        client's timeout makes it time out. A faulted request is never carried out.
        """
        self.faults.append(Fault(re.compile(pattern), method, status, times, delay, reset))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.pattern.search(path) and fault.method in ("*", method):
                    fault.remaining -= 1
                    return fault
        return None


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(state: HubState, base_url: Callable[[], str]) -> Starlette:
    def token_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def authorized(request: Request) -> bool:
        return token_of(request) in state.tokens

    def readable(request: Request, repo_id: str) -> Repo | JSONResponse:
        repo = state.repos.get(repo_id)
        if repo is None or (repo.private and not authorized(request)):
            # The Hub hides private repos behind the same answer as missing ones.
            return _error(401 if not authorized(request) else 404, "Repository not found", "RepoNotFound")
        if repo.gated and not authorized(request):
            return _error(403, f"Access to model {repo_id} is restricted.", "GatedRepo")
        return repo

    def may_write(repo_id: str, creating: bool = False) -> bool:
        namespace = repo_id.split("/")[0]
        writer_orgs = {org for org, role in state.orgs.items() if role in ("admin", "write", "contributor")}
        # The Hub ignores the case of user and organization names.
        if state.token_role == "read" or namespace.lower() not in {n.lower() for n in (state.user, *writer_orgs)}:
            return False
        if state.token_role != "fineGrained":
            return True
        # A fine-grained token writes what its scopes name: a namespace (create and commit), or one repo (commit).
        return "repo.write" in state.fine_grained.get("global", []) or any(
            ((scope["entity"]["type"] in ("user", "org") and scope["entity"]["name"].lower() == namespace.lower())
             or (not creating and scope["entity"]["type"] == "model"
                 and scope["entity"]["name"].lower() == repo_id.lower()))
            and "repo.write" in scope["permissions"]
            for scope in state.fine_grained.get("scoped", [])
        )

    def writable(request: Request, repo_id: str) -> Repo | JSONResponse:
        if not authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        if not may_write(repo_id):
            return _error(403, f"You don't have the rights to write to {repo_id}")
        repo = state.repos.get(repo_id)
        return repo if repo is not None else _error(404, "Repository not found", "RepoNotFound")

    def model_json(repo: Repo, commit: Commit) -> dict[str, Any]:
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "lastModified": repo.created,
            "createdAt": repo.created,
            "tags": [],
            "cardData": repo.card_data,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    async def dispatch(request: Request) -> Response:
        path, method = request.url.path, request.method
        state.requests.append((method, path))
        with state.lock:
            return await route(request, path, method)

    async def route(request: Request, path: str, method: str) -> Response:
        if path == "/api/whoami-v2":
            if not authorized(request):
                return _error(401, "Invalid credentials in Authorization header")
            orgs = [{"type": "org", "name": name, "roleInOrg": role} for name, role in state.orgs.items()]
            token = {"displayName": "test", "role": state.token_role}
            if state.token_role == "fineGrained":
                token["fineGrained"] = {"canReadGatedRepos": False, **state.fine_grained}
            return JSONResponse({"type": "user", "name": state.user, "orgs": orgs,
                                 "auth": {"type": "access_token", "accessToken": token}})
        if path == "/api/repos/create" and method == "POST":
            if not authorized(request):
                return _error(401, "Invalid credentials in Authorization header")
            body = await request.json()
            repo_id = f"{body.get('organization') or state.user}/{body['name']}"
            if not may_write(repo_id, creating=True):
                return _error(403, f"You don't have the rights to create a model under the namespace {repo_id}")
            if repo_id in state.repos:
                # The Hub's 409 carries the existing repo's url; the client reads it with exist_ok=True.
                conflict = _error(409, "You already created this model repo", "RepoExists")
                conflict.body = json.dumps({"error": "exists", "url": f"{base_url()}/{repo_id}"}).encode()
                conflict.headers["content-length"] = str(len(conflict.body))
                return conflict
            private = body.get("visibility", "private" if body.get("private") else "public") != "public"
            state.add_repo_unlocked(repo_id, private=private)
            return JSONResponse({"url": f"{base_url()}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml" and method == "POST":
            # The client checks a README's front matter before committing it; parse it like the Hub would.
            body = await request.json()
            content = body.get("content", "")
            try:
                front = content.split("---", 2)[1] if content.startswith("---") else ""
                yaml.safe_load(front)
            except yaml.YAMLError as error:
                return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, status_code=400)
            return JSONResponse({"errors": [], "warnings": []})
        if path == "/api/models" and method == "GET":
            author, search = request.query_params.get("author"), request.query_params.get("search")
            found = [
                model_json(repo, repo.commits[repo.branches["main"]])
                for repo in state.repos.values()
                if (not repo.private or authorized(request))
                and (author is None or repo.repo_id.split("/")[0] == author)
                and (search is None or search.lower() in repo.repo_id.lower())
            ]
            for item in found:
                item.pop("siblings")
            return JSONResponse(found)
        match = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(.*))?$", path)
        if match:
            return await model_route(request, match.group(1), match.group(2) or "", method)
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if match and method in ("GET", "HEAD"):
            repo = readable(request, match.group(1))
            if isinstance(repo, Response):
                return repo
            commit = repo.resolve(match.group(2))
            if commit is None:
                return _error(404, "Invalid rev id", "RevisionNotFound")
            data = commit.files.get(match.group(3))
            if data is None:
                return _error(404, "Entry not found", "EntryNotFound")
            headers = {
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{_git_blob_sha(data)}"',
                "Content-Length": str(len(data)),
            }
            return Response(b"" if method == "HEAD" else data, headers=headers)
        return _error(404, f"no route for {method} {path}")

    async def model_route(request: Request, repo_id: str, rest: str, method: str) -> Response:
        if rest == "" or rest.startswith("revision/"):
            repo = readable(request, repo_id)
            if isinstance(repo, Response):
                return repo
            commit = repo.resolve(rest[len("revision/") :] if rest else "main")
            if commit is None:
                return _error(404, "Invalid rev id", "RevisionNotFound")
            return JSONResponse(model_json(repo, commit))
        if rest.startswith("tree/") and method == "GET":
            repo = readable(request, repo_id)
            if isinstance(repo, Response):
                return repo
            revision, _, prefix = rest[len("tree/") :].partition("/")
            commit = repo.resolve(revision)
            if commit is None:
                return _error(404, "Invalid rev id", "RevisionNotFound")
            entries = [
                {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": p}
                for p, data in sorted(commit.files.items())
                if p.startswith(prefix)
            ]
            return JSONResponse(entries)
        if rest == "refs" and method == "GET":
            repo = readable(request, repo_id)
            if isinstance(repo, Response):
                return repo
            return JSONResponse(
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()
                    ],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                    "converts": [],
                }
            )
        repo = writable(request, repo_id)
        if isinstance(repo, Response):
            return repo
        if rest.startswith("preupload/") and method == "POST":
            body = await request.json()
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
            return JSONResponse({"files": files, "commitOid": repo.branches.get("main")})
        if rest.startswith("commit/") and method == "POST":
            branch = rest[len("commit/") :]
            if branch not in repo.branches:
                return _error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            added: dict[str, bytes] = {}
            deleted: set[str] = set()
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                parent = item["value"].get("parentCommit") if item["key"] == "header" else None
                if parent is not None and parent != repo.branches[branch]:
                    return _error(412, "A commit has happened since. Please refresh and try again.")
                if item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.add(item["value"]["path"])
                elif item["key"] == "lfsFile":
                    return _error(400, "this test server only accepts regular uploads")
            commit = state.commit(repo, branch, added, deleted, "commit")
            return JSONResponse(
                {
                    "commitUrl": f"{base_url()}/{repo_id}/commit/{commit.oid}",
                    "commitOid": commit.oid,
                    "pullRequestUrl": None,
                }
            )
        if rest.startswith("branch/") and method == "POST":
            branch = rest[len("branch/") :]
            if branch in repo.branches:
                return _error(409, "Reference already exists")
            body = await request.body()
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            commit = repo.resolve(start)
            if commit is None:
                return _error(404, "Invalid rev id", "RevisionNotFound")
            repo.branches[branch] = commit.oid
            return JSONResponse({})
        if rest.startswith("tag/") and method == "POST":
            commit = repo.resolve(rest[len("tag/") :])
            tag = (await request.json())["tag"]
            if commit is None:
                return _error(404, "Invalid rev id", "RevisionNotFound")
            if tag in repo.tags:
                return _error(409, "Tag already exists")
            repo.tags[tag] = commit.oid
            return JSONResponse({})
        if rest == "settings" and method == "PUT":
            body = await request.json()
            if "private" in body:
                repo.private = bool(body["private"])
            if body.get("visibility"):
                repo.private = body["visibility"] != "public"
            return JSONResponse({})
        return _error(404, f"no route for {method} /api/models/{repo_id}/{rest}")

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
    return with_faults(Starlette(routes=[Route("/{path:path}", dispatch, methods=methods)]), state)


ASGIApp = Callable[[dict[str, Any], Callable[..., Any], Callable[..., Any]], Any]


def with_faults(app: ASGIApp, state: HubState) -> ASGIApp:
    """The app behind a layer that injects the faults of ``state`` before a request reaches it.

    It sits outside Starlette so that it holds uvicorn's own ``send``, whose connection it can reset.
    """

    async def faulty(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        fault = state.take_fault(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if fault is None:
            await app(scope, receive, send)
            return
        state.requests.append((scope["method"], scope["path"]))
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reset:
            _reset_connection(send)
            return
        await _error(fault.status, f"injected fault {fault.status}")(scope, receive, send)

    return faulty


def _reset_connection(send: Callable[..., Any]) -> None:
    """Abort the request's TCP connection with an RST (SO_LINGER 0), as a crashed proxy or server would."""
    # uvicorn passes a bound method of its per-request cycle object, which holds the asyncio transport.
    transport = send.__self__.transport  # type: ignore[attr-defined]
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class HubServer:
    """Runs the app with uvicorn on a free loopback port in a background thread."""

    def __init__(self, tokens: set[str] | None = None, port: int = 0) -> None:
        self.state = HubState(tokens or set())
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = build_app(self.state, lambda: self.url)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test Hub server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


if __name__ == "__main__":
    import sys

    with HubServer(tokens={"hf_local"}, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8765) as hub:
        print(f"serving on {hub.url} (token hf_local); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
