"""The Hugging Face Hub as llmrec reaches it: `hf://owner/repo[@revision]` names a pushed run, fetched through
huggingface_hub's cache, and every failure of a push or a download becomes one paragraph that names the repository
and says what to do (`hub_error`). Publishing itself is `llmrec.publish.push`."""

from __future__ import annotations

from pathlib import Path

from llmrec.errors import LLMRecError

HUB_SCHEME = "hf://"


def is_hub_ref(ref: str | Path) -> bool:
    return str(ref).startswith(HUB_SCHEME)


def local_run_dir(ref: str | Path) -> Path:
    """The run directory `ref` names: a local folder as given, or `hf://owner/repo[@revision]` fetched into
    huggingface_hub's cache."""
    if not is_hub_ref(ref):
        return Path(ref)
    from huggingface_hub import get_token, snapshot_download

    repo_id, _, revision = str(ref)[len(HUB_SCHEME):].partition("@")
    check_repo_id(repo_id, str(ref))
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, token=get_token() or False))
    except Exception as err:  # noqa: BLE001 - every failure becomes one paragraph naming the repository
        raise hub_error(err, repo_id, "download", revision) from None


def check_repo_id(repo_id: str, where: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise LLMRecError(f"{repo_id!r} is not a Hub repository id ('owner/name'): {err}", where) from None


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def transient(err: Exception) -> bool:
    """A server error or a dropped connection: worth retrying (a commit is atomic, so it cannot land twice)."""
    status = _status(err)
    return (status is not None and status >= 500) or _unreachable(err)


def _unreachable(err: Exception) -> bool:
    """A connection that failed or dropped. huggingface_hub uses httpx or httpx2 depending on its version, so the
    transport errors are recognised by class name."""
    return isinstance(err, ConnectionError | TimeoutError) or any(
        cls.__name__ in ("TransportError", "TimeoutException") for cls in type(err).__mro__)


def reason(err: Exception) -> str:
    status = _status(err)
    return f"HTTP {status}" if status else type(err).__name__


def hub_error(err: Exception, repo_id: str, action: str, revision: str | None = None,
               attempts: int = 1) -> LLMRecError:
    """One paragraph for a failed push or download: what happened to which repository, and what to do."""
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(err)
    nothing = " Nothing was published." if action == "push" else ""
    if isinstance(err, RevisionNotFoundError):
        message = f"the repository has no revision {revision!r} (branch, tag or commit); check its name."
    elif isinstance(err, RepositoryNotFoundError) or status == 404:
        message = ("the repository does not exist, or it is private and the token (HF_TOKEN or the stored login) "
                   "may not read it.")
    elif status == 401:
        message = ("the Hub refused the token (401: invalid or expired). Set HF_TOKEN to a valid token with write "
                   "access, or log in again with `hf auth login`.")
    elif status == 403:
        message = ("the token may not write to this repository (403): it belongs to another user or organisation, "
                   "or the token is read-only. Push to a repository under your own name, or ask its owner for "
                   "write access.")
    elif status is not None and status >= 500:
        message = (f"the Hub answered with a server error (HTTP {status}) {attempts} time(s) in a row; try again "
                   "later.")
    elif _unreachable(err) or isinstance(err, OfflineModeIsEnabled | LocalEntryNotFoundError):
        message = (f"could not reach the Hub ({type(err).__name__}); check the network (or HF_ENDPOINT), or unset "
                   "HF_HUB_OFFLINE.")
    elif status is not None:
        message = f"the Hub refused the {action} (HTTP {status})."
    else:
        message = f"the {action} failed: {type(err).__name__}: {err}"
    return LLMRecError(message + nothing, f"{HUB_SCHEME}{repo_id}" if action == "download" else repo_id)
