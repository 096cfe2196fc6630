"""Hugging Face Hub sources and targets.

A source is read at one commit SHA (resolved once from the requested revision), so a push to the repo
during a conversion cannot mix two versions of a checkpoint. Bytes come from the ``resolve`` endpoint
with HTTP ``Range`` requests on one httpx2 client (the HTTP stack huggingface_hub itself uses), which
follows the Hub's redirects to its CDN and drops the token when leaving the Hub's origin.

A target publishes everything in a single commit (optionally a pull request) because the Hub
rate-limits commits and a commit is atomic: nobody sees half an upload.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from urllib.parse import quote

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from worker.engine.errors import CheckpointError, RecastError
from worker.engine.storage import check_relative

from . import TransientStorageError, check_range, publish_order
from .listed import ListedSource
from .local import LocalStaging, keep_only, remove_tree
from .locations import Location
from .settings import StoreSettings

_TIMEOUT = 60.0  # seconds without progress before a Hub request counts as failed (and retryable)
_TARGET_HINT = "; Recast does not create repositories or branches, so create it on the Hub first"


def hub_error(
    exc: BaseException, what: str, credential: str | None, missing: type[RecastError], hint: str = ""
) -> RecastError | None:
    """A RecastError for a Hub failure about ``what``, or None when it is not a Hub or network failure.

    Messages name the credential, never the token, and not the server's text.
    """
    err: BaseException | None = exc
    while err is not None and not isinstance(err, HfHubHTTPError | httpx2.TransportError):
        err = err.__cause__ or err.__context__
    who = (
        f"the credential {credential!r}"
        if credential
        else "the ambient Hugging Face token (HF_TOKEN), if any"
    )
    if isinstance(err, GatedRepoError):
        return RecastError(
            f"{what}: the repository is gated; accept its terms on the Hub for the account of {who}"
        )
    if isinstance(err, RepositoryNotFoundError):
        return missing(
            f"{what}: repository not found or not visible to {who}; check the name, and for a private "
            f"repository name a credential whose token can access it{hint}"
        )
    if isinstance(err, RevisionNotFoundError):
        return missing(f"{what}: revision not found; check the branch, tag or commit{hint}")
    if isinstance(err, RemoteEntryNotFoundError):
        return missing(f"{what}: no such file at this revision")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code
        if status == 429 or status >= 500:
            return TransientStorageError(
                f"{what}: the Hub is unavailable or limiting requests (HTTP {status})"
            )
        if status in (401, 403):
            return RecastError(
                f"{what}: access denied (HTTP {status}); check that {who} may access this repository"
            )
        if status == 416:
            return CheckpointError(f"{what}: the requested bytes lie past the end of the file; truncated")
        return RecastError(f"{what}: Hub request failed (HTTP {status})")
    if isinstance(err, httpx2.TransportError):
        return TransientStorageError(f"{what}: cannot reach the Hub ({type(err).__name__}); retry later")
    return None


@contextmanager
def _translated(
    what: str, credential: str | None, missing: type[RecastError], hint: str = ""
) -> Iterator[None]:
    try:
        yield
    except (HfHubHTTPError, httpx2.HTTPError, ValueError, RuntimeError, OSError) as exc:
        # create_commit wraps upload failures in ValueError/RuntimeError; anything else passes through.
        if (error := hub_error(exc, what, credential, missing, hint)) is None:
            raise
        raise error from exc


def _api(settings: StoreSettings, credential: str | None) -> tuple[HfApi, str | None]:
    token = settings.credential(credential, "hf").get("token")
    return HfApi(endpoint=settings.hf_endpoint, token=token), token


def resolve_commit(loc: Location, settings: StoreSettings, credential: str | None) -> str:
    """The commit SHA that ``loc``'s revision (default ``main``) points at now."""
    api, _ = _api(settings, credential)
    with _translated(loc.url, credential, CheckpointError):
        info = api.model_info(loc.root, revision=loc.revision or "main", timeout=_TIMEOUT)
    if not info.sha:
        raise RecastError(f"{loc.url}: the Hub did not report a commit for this revision")
    return info.sha


class HubSource(ListedSource):
    """A model repo at one commit, read by ranged GETs on ``{endpoint}/{repo}/resolve/{sha}/{path}``.

    Files with a hidden path component (``.gitattributes``) are not part of the checkpoint.
    """

    def __init__(self, loc: Location, settings: StoreSettings, credential: str | None = None):
        self.api, token = _api(settings, credential)
        self.repo = loc.root
        self.sha = loc.revision
        self.description = loc.url
        self.credential = credential
        self.endpoint = settings.hf_endpoint
        self.client = httpx2.Client(
            headers=build_hf_headers(token=token),
            follow_redirects=True,
            timeout=httpx2.Timeout(_TIMEOUT, connect=10.0),
        )
        self._sizes: dict[str, int] | None = None

    def _where(self, name: str) -> str:
        return f"hf://{self.repo}@{self.sha}/{name}"

    def sizes(self) -> dict[str, int]:
        """Every file's size by path (one recursive tree listing, then cached)."""
        if self._sizes is None:
            with _translated(self.description, self.credential, CheckpointError):
                entries = list(self.api.list_repo_tree(self.repo, revision=self.sha, recursive=True))
            self._sizes = {
                e.path: e.size
                for e in entries
                if isinstance(e, RepoFile) and not any(p.startswith(".") for p in e.path.split("/"))
            }
        return self._sizes

    def read_range(self, name: str, start: int, end: int) -> bytes:
        check_range(self._where(check_relative(name, self.description)), start, end)
        if start == end:
            return b""
        url = f"{self.endpoint}/{self.repo}/resolve/{self.sha}/{quote(name)}"
        want = end - start
        headers = {"Range": f"bytes={start}-{end - 1}"}
        with (
            _translated(self._where(name), self.credential, CheckpointError),
            self.client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 400:
                response.read()  # the error classifier reads the body
                hf_raise_for_status(response)
            if response.status_code == 200 and start != 0:
                raise CheckpointError(f"{self._where(name)}: the server ignored the byte range")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= want:
                    break
        if len(data) < want or (response.status_code == 206 and len(data) != want):
            raise CheckpointError(
                f"{self._where(name)}: expected {want} bytes at offset {start}, got {len(data)}; truncated"
            )
        return bytes(data[:want])


class HubTarget(LocalStaging):
    """A model repo (branch ``main`` unless the URL names one), written in one commit.

    The staged output stays on this worker's local disk, under ``<scratch>/hub-staging/<job_id>``, until
    the single commit uploads it, so the scratch volume needs room for the whole converted checkpoint.
    """

    def __init__(self, loc: Location, settings: StoreSettings, job_id: str, credential: str | None = None):
        self.api, _ = _api(settings, credential)
        self.repo = loc.root
        self.revision = loc.revision or "main"
        self.staging = settings.scratch / "hub-staging" / job_id
        self.description = loc.url
        self.credential = credential

    def _errors(self) -> AbstractContextManager[None]:
        return _translated(self.description, self.credential, RecastError, _TARGET_HINT)

    def is_empty(self) -> bool:
        """No ``*.safetensors`` file on the branch yet (a README or .gitattributes is fine)."""
        with self._errors():
            for entry in self.api.list_repo_tree(self.repo, revision=self.revision, recursive=True):
                if isinstance(entry, RepoFile) and entry.path.endswith(".safetensors"):
                    return False
        return True

    def publish(self, names: list[str], commit_message: str, create_pr: bool) -> dict[str, str]:
        """One commit adding every staged file (a pull request if ``create_pr``), then drop staging."""
        keep_only(self.staging, names)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(self.staging / name))
            for name in publish_order(names)
        ]
        with self._errors():
            info = self.api.create_commit(
                self.repo,
                operations,
                commit_message=commit_message,
                revision=self.revision,
                create_pr=create_pr,
            )
        self.discard()
        result = {"url": f"hf://{self.repo}@{info.oid}", "commit": info.oid}
        if info.pr_url:
            result["pr_url"] = info.pr_url
        return result

    def discard(self) -> None:
        remove_tree(self.staging)
