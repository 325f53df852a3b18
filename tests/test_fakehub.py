"""The fake Hub of tests/fakehub.py, driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import _http

pytest_plugins = ["fakehub"]

TOKEN = "hf_alice_secret"
HEADER = json.dumps({"w": {"dtype": "U8", "shape": [1024], "data_offsets": [0, 1024]}}).encode()
FILES = {
    "config.json": b'{"hidden_size": 8}',
    "README.md": b"---\nlicense: mit\n---\n# A model\n",  # makes upload_folder call /api/validate-yaml
    "adapter/model.safetensors": len(HEADER).to_bytes(8, "little") + HEADER + bytes(range(256)) * 4,
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "upload"
    for path, data in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


@pytest.fixture
def hub(fake_hub):
    fake_hub.tokens[TOKEN] = "alice"
    return fake_hub


def read_tree(root: str | Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_upload_folder_makes_one_commit_and_downloads_back(hub, folder, tmp_path):
    api = HfApi(token=TOKEN)  # no endpoint: the fixture points the default at the fake Hub
    api.create_repo("alice/model", private=True, exist_ok=True)
    api.create_repo("alice/model", private=True, exist_ok=True)  # 409, swallowed by exist_ok
    info = api.upload_folder(folder_path=folder, repo_id="alice/model", commit_message="first upload")

    (commit,) = hub.commits("alice/model")
    assert (commit.message, commit.files, commit.sha) == ("first upload", FILES, info.oid)
    assert hub.files("alice/model") == FILES
    assert [r.path for r in hub.requests if r.method == "POST" and "/commit/" in r.path] == [
        "/api/models/alice/model/commit/main"
    ]

    snapshot = snapshot_download("alice/model", cache_dir=tmp_path / "cache", token=TOKEN)
    assert Path(snapshot).name == commit.sha
    assert read_tree(snapshot) == FILES
    weights = hf_hub_download("alice/model", "adapter/model.safetensors", cache_dir=tmp_path / "c2", token=TOKEN)
    assert Path(weights).read_bytes() == FILES["adapter/model.safetensors"]

    for request in hub.requests:
        assert TOKEN not in request.path and TOKEN.encode() not in request.body
        assert all(TOKEN not in value for name, value in request.headers.items() if name != "authorization")


def test_branch_whoami_and_explicit_endpoint(hub, folder, tmp_path):
    hub.orgs["team"] = {"alice"}
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.whoami()["name"] == "alice"
    assert [org["name"] for org in api.whoami()["orgs"]] == ["team"]

    api.create_repo("team/model")
    api.create_branch("team/model", branch="dev", exist_ok=True)
    api.create_branch("team/model", branch="dev", exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id="team/model", revision="dev", commit_message="on dev")

    assert hub.files("team/model", "dev") == FILES and hub.files("team/model") == {}
    snapshot = snapshot_download("team/model", revision="dev", cache_dir=tmp_path / "cache", endpoint=hub.url)
    assert Path(snapshot).name == info.oid and read_tree(snapshot) == FILES


def test_missing_token_is_401_and_private_repos_are_hidden(hub, tmp_path):
    with pytest.raises(HfHubHTTPError) as error:
        HfApi().create_repo("alice/model")
    assert error.value.response.status_code == 401

    hub.add_repo("alice/secret", {"a.txt": b"a"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret", cache_dir=tmp_path)


def test_someone_elses_namespace_is_403(hub, folder):
    hub.add_repo("bob/model", {"a.txt": b"a"})
    api = HfApi(token=TOKEN)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("bob/new")
    assert error.value.response.status_code == 403
    # huggingface_hub 2.4.0 falls back to repo_info on a 403 with exist_ok, and bob's repo is public
    api.create_repo("bob/model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_folder(folder_path=folder, repo_id="bob/model")
    assert error.value.response.status_code == 403
    assert len(hub.commits("bob/model")) == 1


def test_injected_500_reaches_the_client(hub):
    hub.fail_next = [("/api/repos/create", 500)]
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=TOKEN).create_repo("alice/model")
    assert error.value.response.status_code == 500
    HfApi(token=TOKEN).create_repo("alice/model")  # the failure was used up


def test_upload_folder_retries_its_commit_after_500s(hub, folder, monkeypatch):
    sleeps = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=sleeps.append))  # the backoff's only use of time
    hub.add_repo("alice/model")
    hub.fail_next = [("/commit/", 500)] * 3
    HfApi(token=TOKEN).upload_folder(folder_path=folder, repo_id="alice/model")
    assert sleeps == [1, 2, 4]
    assert sum(r.method == "POST" and "/commit/" in r.path for r in hub.requests) == 4
    assert len(hub.commits("alice/model")) == 1


def test_unknown_revision_and_repo(hub, folder, tmp_path):
    hub.add_repo("alice/model", {"a.txt": b"a"})
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("alice/model", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/model", "a.txt", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        HfApi(token=TOKEN).upload_folder(folder_path=folder, repo_id="alice/model", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/other", cache_dir=tmp_path)


def test_child_processes_reach_the_fake_hub_through_hf_endpoint(hub):
    code = f"from huggingface_hub import whoami; print(whoami(token={TOKEN!r})['name'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "alice", result.stderr
