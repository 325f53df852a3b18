"""A fake Hugging Face Hub on loopback, for tests only (no network, in-memory state).

`FakeHub` is a `ThreadingHTTPServer` that speaks the part of the Hub HTTP protocol that huggingface_hub 2.4.0 uses
(read from its installed source) for:

- `create_repo` (POST /api/repos/create), `create_branch` (POST .../branch/{branch}), `list_repo_refs` (GET .../refs);
- `upload_folder` / `create_commit` in REGULAR mode only: the preupload answer says "regular" for every file, so
  file contents arrive base64-encoded in the NDJSON commit body and no LFS or Xet transfer is ever attempted;
  README.md makes the client call POST /api/validate-yaml first, which always passes;
- `repo_info` / `model_info` / `dataset_info` (GET /api/{type}s/{repo}[/revision/{rev}], with sha and siblings),
  `list_repo_tree` / `list_repo_files` (GET .../tree/{rev}[/{path}]);
- `hf_hub_download` / `snapshot_download`: HEAD and GET /[{type}s/]{repo}/resolve/{rev}/{path} with ETag,
  X-Repo-Commit and Content-Length and no Xet headers, so plain HTTP downloads are used;
- `whoami` (GET /api/whoami-v2).

Anything else gets a 404 without an error code, e.g. GET /api/agent-harnesses, which huggingface_hub fetches at most
once per process to build its user agent (it then detects no agent).

Using it: `pytest_plugins = ["fakehub"]` in a test module makes the `fake_hub` fixture available (tests/ is on
sys.path, as for `from conftest import ...`). The fixture starts a `FakeHub` on 127.0.0.1 with a free port and
enters `hub_environment(url, home)`, so plain calls reach it:

    def test_push(fake_hub, tmp_path):
        fake_hub.tokens["tok"] = "alice"
        HfApi(token="tok").create_repo("alice/model")
        ...
        assert len(fake_hub.commits("alice/model")) == 1

`HfApi(endpoint=fake_hub.url)` works too. Setting HF_ENDPOINT inside a test is not enough: huggingface_hub reads it
once, at import, into `constants.ENDPOINT`, `constants.HUGGINGFACE_CO_URL_TEMPLATE`, `constants.HF_URL_HOSTS` and the
module-level `HfApi` behind `huggingface_hub.create_repo` & co. `hub_environment` patches those for the duration of a
`with` block (HfApi objects made before it keep their endpoint) and also sets HF_ENDPOINT, HF_HUB_OFFLINE=0 and
HF_HOME for child processes. It also turns offline mode off in-process (tests/conftest.py sets HF_HUB_OFFLINE=1,
which makes huggingface_hub refuse every request), hides the developer's token (HF_TOKEN, the token file) so only the
tokens a test passes are sent, and points the default download cache into `home`. Libraries that copied these
constants at their own import (transformers, datasets) are not patched: pass `cache_dir`/`endpoint` to them.

Knobs on the server: `tokens` (token -> user; a bad token is a 401 on any request, a write needs a good one),
`orgs` (org -> member users, who may write to it like its owner), `fail_next` (injected errors), `requests` (every
request received); state: `add_repo`, `commits`, `files`. A private repo is visible to its namespace only (others get
RepoNotFound). Differences from the real Hub: a new repo's first commit is empty (no .gitattributes), revisions are
branch names or full commit shas (no tags), no pull requests.

huggingface_hub 2.4.0 behaviours worth knowing when writing tests against it:
- With hf_xet installed (it is), `upload_folder` does not go through `create_commit` but through its upload pipeline
  (`_upload_pipeline.py`): preupload, then commits of at most 250 files (at first); it retries the commit POST with
  `http_backoff` and splits a failed commit of more than 20 files into smaller ones. `create_commit` never retries its
  commit POST. Both skip files whose preupload "oid" matches, so re-uploading unchanged files makes no commit.
- `http_backoff` (preupload, tree listing, pipeline commits) retries 408, 429, 500, 502, 503 and 504 up to 5 times,
  sleeping 1, 2, 4, 8, 8 s (patch `huggingface_hub.utils._http.time` to skip them, as test_fakehub.py does).
  create_repo, create_branch, whoami, repo_info and `create_commit`'s commit are not retried. The HEAD of a download
  is tried once, then, if the file is not cached, again with the backoff; its GET is retried on 408/429 only.
- `create_repo(exist_ok=True)` ignores a 409 but then reads "url" from the 409 body; on 401/402/403 it calls
  `repo_info` and returns normally if the repo is readable, so it does not raise for someone else's existing public
  repo: the 403 comes with the upload.
- Errors are classified by the X-Error-Code header: "RepoNotFound", "RevisionNotFound", "EntryNotFound". A 401 is
  turned into RepositoryNotFoundError only on https URLs, so here it stays a plain HfHubHTTPError with status 401.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants, hf_api
from huggingface_hub.utils import close_session

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha(data: bytes) -> str:
    """The git object id of `data`: what the Hub uses as ETag, blobId and oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str  # 40 hex digits
    message: str
    description: str
    files: dict[str, bytes]  # what this commit added or changed
    deleted: list[str]  # what it removed
    tree: dict[str, bytes]  # every file of the repo after it
    date: str  # in the Hub's format


@dataclass
class Request:
    method: str
    path: str  # as sent: URL-encoded, with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, list[Commit]]  # oldest first; [0] is the empty commit of the repo's creation

    def history(self, revision: str) -> list[Commit]:
        """The commits up to `revision` (a branch or a full commit sha), or a RevisionNotFound error."""
        if revision in self.branches:
            return self.branches[revision]
        for commits in self.branches.values():
            for i, commit in enumerate(commits):
                if commit.sha == revision:
                    return commits[: i + 1]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubError(Exception):
    """An error answer: a JSON body {"error": message, **extra} and the X-Error-* headers the client parses."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self.body = {"error": message, **extra}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _json(data, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


class FakeHub(ThreadingHTTPServer):
    """The server and its state; see the module docstring. Start with `start()`, stop with `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.tokens: dict[str, str] = {}  # token -> user name
        self.orgs: dict[str, set[str]] = {}  # organisation -> names of its members, who may write to it
        # (substring of the request path or None for any request, status): the next matching request gets that
        # status instead of its answer; each entry is used once, in order.
        self.fail_next: list[tuple[str | None, int]] = []
        self.requests: list[Request] = []
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo type, repo id) -> repo
        # requests are served in threads: one at a time touches the state (reentrant: routes call add_repo)
        self.lock = threading.RLock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        # a short poll interval: `stop()` waits for the loop to see it, and tests stop a server each
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.url}/{prefix}{repo_id}"

    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False, repo_type: str = "model"
    ) -> Repo:
        """Create a repo directly (owned by its namespace), with `files` in one commit on main if given."""
        with self.lock:
            repo = Repo(repo_id, repo_type, private, {"main": []})
            self.repos[repo_type, repo_id] = repo
            self._append_commit(repo.branches["main"], "initial commit", {})
            if files:
                self._append_commit(repo.branches["main"], "add files", dict(files))
            return repo

    def _append_commit(self, history: list[Commit], message: str, tree: dict, description: str = "") -> Commit:
        """Append a commit whose file set is `tree` to a branch's `history`."""
        parent = history[-1].tree if history else {}
        changed = {path: data for path, data in tree.items() if parent.get(path) != data}
        deleted = sorted(set(parent) - set(tree))
        commit = Commit(secrets.token_hex(20), message, description, changed, deleted, tree, _now())
        history.append(commit)
        return commit

    def commits(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[Commit]:
        """The commits on `branch`, oldest first, without the empty one made when the repo was created."""
        with self.lock:
            return list(self.repos[repo_type, repo_id].branches[branch][1:])

    def files(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files on `branch` now: path -> content."""
        with self.lock:
            return dict(self.repos[repo_type, repo_id].branches[branch][-1].tree)

    def can_write(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, ())

    def pop_failure(self, path: str) -> int | None:
        for i, (substring, status) in enumerate(self.fail_next):
            if substring is None or substring in path:
                del self.fail_next[i]
                return status
        return None


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    # HTTP/1.0 (the default): one request per connection, so no keep-alive thread outlives a test's server

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def log_message(self, format, *args):
        pass  # pytest shows failures; a line per request on stderr is noise

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sent = {name.lower(): value for name, value in self.headers.items()}
        with self.server.lock:
            self.server.requests.append(Request(self.command, self.path, sent, body))
            try:
                status, headers, payload = self._route(body)
            except HubError as error:
                status, headers, payload = _json(error.body, error.status)
                headers.update(error.headers)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        # for HEAD too: the client reads the file size from it
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _route(self, body: bytes) -> tuple[int, dict, bytes]:
        status = self.server.pop_failure(self.path)
        if status is not None:
            raise HubError(status, f"fake hub: injected HTTP {status}")
        self.user = self._authenticate()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # split before unquoting: a revision like "v1/x" arrives as one segment "v1%2Fx"
        segments = [unquote(segment) for segment in url.path.split("/")[1:]]
        match self.command, segments:
            case "GET", ["api", "whoami-v2"]:
                return self._whoami()
            case "POST", ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            case "POST", ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            case _, ["api", kind, namespace, name, *rest] if kind in REPO_TYPES:
                return self._repo_api(REPO_TYPES[kind], f"{namespace}/{name}", rest, body)
            case "GET" | "HEAD", [("datasets" | "spaces") as kind, namespace, name, "resolve", rev, *path] if path:
                return self._resolve(REPO_TYPES[kind], f"{namespace}/{name}", rev, "/".join(path))
            case "GET" | "HEAD", [namespace, name, "resolve", rev, *path] if path:
                return self._resolve("model", f"{namespace}/{name}", rev, "/".join(path))
        raise HubError(404, f"fake hub: no route for {self.command} {url.path}")

    def _authenticate(self) -> str | None:
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return None
        user = self.server.tokens.get(authorization.removeprefix("Bearer "))
        if user is None:  # the Hub rejects a bad token even where no token is needed
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _check_write(self, namespace: str) -> None:
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        if not self.server.can_write(self.user, namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        namespace = repo_id.split("/")[0]
        if write:  # like the Hub, rights on the namespace are checked before the repo's existence
            self._check_write(namespace)
        repo = self.server.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not (self.user and self.server.can_write(self.user, namespace))):
            raise HubError(401 if self.user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _whoami(self):
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org} for org, members in self.server.orgs.items() if self.user in members]
        return _json(
            {
                "type": "user",
                "id": self.user,
                "name": self.user,
                "fullname": self.user,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict):
        namespace = payload.get("organization") or self.user
        self._check_write(namespace)
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        url = self.server.repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.server.repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        self.server.add_repo(repo_id, private=payload.get("visibility") == "private", repo_type=repo_type)
        return _json({"url": url, "name": repo_id})

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str], body: bytes):
        match self.command, rest:
            case "GET", []:
                return self._info(self._repo(repo_type, repo_id), "main")
            case "GET", ["revision", revision]:
                return self._info(self._repo(repo_type, repo_id), revision)
            case "GET", ["tree", revision, *path]:
                return self._tree(self._repo(repo_type, repo_id), revision, "/".join(path))
            case "GET", ["refs"]:
                return self._refs(self._repo(repo_type, repo_id))
            case "POST", ["preupload", revision]:
                return self._preupload(self._repo(repo_type, repo_id, write=True), revision, json.loads(body))
            case "POST", ["commit", revision]:
                return self._commit(self._repo(repo_type, repo_id, write=True), revision, body)
            case "POST", ["branch", branch]:
                payload = json.loads(body or "{}")
                return self._create_branch(self._repo(repo_type, repo_id, write=True), branch, payload)
        raise HubError(404, f"fake hub: no route for {self.command} {self.path}")

    def _info(self, repo: Repo, revision: str):
        commit = repo.history(revision)[-1]
        siblings = [
            {"rfilename": path, "size": len(data), "blobId": git_blob_sha(data)}
            for path, data in sorted(commit.tree.items())
        ]
        return _json(
            {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "lastModified": commit.date,
                "siblings": siblings,
            }
        )

    def _tree(self, repo: Repo, revision: str, base: str):
        commit = repo.history(revision)[-1]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{base}/" if base else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            folders = [prefix + "/".join(parts[:i]) for i in range(1, len(parts))]
            for folder in folders if recursive else folders[:1]:
                # not a real git tree id: huggingface_hub only stores it
                oid = hashlib.sha1(f"tree {commit.sha} {folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
        if base and not entries:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        return _json(list(entries.values()))

    def _refs(self, repo: Repo):
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commits[-1].sha}
            for name, commits in repo.branches.items()
        ]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _branch(self, repo: Repo, branch: str) -> list[Commit]:
        """A branch's history to write to: a commit sha or an unknown name is a RevisionNotFound error."""
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return repo.branches[branch]

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        head = self._branch(repo, revision)[-1]
        # the "oid" of a file already on the branch lets the client skip unchanged files, as with the real Hub
        files = [
            {
                "path": file["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha(head.tree[file["path"]]) if file["path"] in head.tree else None,
            }
            for file in payload["files"]
        ]
        return _json({"files": files, "commitOid": head.sha})

    def _commit(self, repo: Repo, revision: str, body: bytes):
        if "create_pr" in self.query:
            raise HubError(400, "fake hub: pull requests are not supported")
        history = self._branch(repo, revision)
        tree = dict(history[-1].tree)
        header = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and parent != history[-1].sha:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":  # huggingface_hub always sends regular files base64-encoded
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                tree = {path: data for path, data in tree.items() if not path.startswith(folder)}
            else:  # lfsFile: this fake never answers "lfs" to a preupload
                raise HubError(400, f"fake hub: unsupported commit operation {key!r}")
        commit = self.server._append_commit(history, header.get("summary", ""), tree, header.get("description", ""))
        return _json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.server.repo_url(repo.repo_type, repo.repo_id)}/commit/{commit.sha}",
                "commitMessage": commit.message,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        repo.branches[branch] = list(repo.history(payload.get("startingPoint") or "main"))
        return _json({})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        commit = self._repo(repo_type, repo_id).history(revision)[-1]
        if path not in commit.tree:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = commit.tree[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(data)}"',
            "X-Repo-Commit": commit.sha,
        }
        return 200, headers, data


@contextlib.contextmanager
def hub_environment(url: str, home: Path) -> Iterator[None]:
    """Point huggingface_hub, in this process and its children, at the Hub at `url`, with `home` as HF_HOME."""
    home = Path(home)
    with pytest.MonkeyPatch.context() as patch:
        # these would hand the developer's token to the client, or win over HF_HOME in child processes
        tokens = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH")
        for name in (*tokens, "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            patch.delenv(name, raising=False)
        for name in ("no_proxy", "NO_PROXY"):  # both spellings: which one wins depends on their order in environ
            patch.setenv(name, ",".join(filter(None, [os.environ.get(name), urlsplit(url).hostname])))
        patch.setenv("HF_ENDPOINT", url)
        patch.setenv("HF_HUB_OFFLINE", "0")
        patch.setenv("HF_HOME", str(home))
        patch.setattr(constants, "ENDPOINT", url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(url).hostname})
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        patch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(hf_api.api, "endpoint", url)
        # the shared httpx client read the proxy settings when it was made; let it be remade for this Hub
        close_session()
        try:
            yield
        finally:
            close_session()


@pytest.fixture
def fake_hub(tmp_path_factory) -> Iterator[FakeHub]:
    """A running `FakeHub` that huggingface_hub's default endpoint points at (see `hub_environment`)."""
    server = FakeHub().start()
    try:
        with hub_environment(server.url, tmp_path_factory.mktemp("hf_home")):
            yield server
    finally:
        server.stop()
