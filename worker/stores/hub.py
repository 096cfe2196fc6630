"""Hugging Face Hub sources and targets.

A source is read at one commit SHA (resolved once from the requested revision), so a push to the repo
during a conversion cannot mix two versions of a checkpoint. Bytes come from the ``resolve`` endpoint
with HTTP ``Range`` requests on one httpx2 client (the HTTP stack huggingface_hub itself uses), which
follows the Hub's redirects to its CDN and drops the token when leaving the Hub's origin.

The commit protocol of a target, which moves every output byte once and makes one commit:

1. ``stage_file``, on the worker that wrote the shard, uploads it as an LFS (or Xet) object through
   ``HfApi.preupload_lfs_files``; its receipt is the object's SHA-256 and size. A small file the Hub
   keeps as a regular git blob (config, index, recast.json, SHA256SUMS) is not uploaded: its receipt
   carries its content.
2. ``publish``, on any machine and without the files, makes the one commit (or pull request) from the
   receipts: an ``lfsFile`` line per uploaded object, the regular files' content inline.

What a reader sees: the branch before the commit, then the branch with the whole output (a commit is
atomic); uploaded objects are in no commit, so nobody sees them. What a dead worker leaves: an uploaded
object no commit refers to, which the retried shard uploads again as a no-op (same SHA-256). There is
nothing for ``discard`` to remove: the Hub deletes LFS objects only with ``permanently_delete_lfs_files``,
which would also cut the content out of any commit that happens to share it. A finalize that dies after
the commit but before recording it finds, when run again, the branch head (or a pull request) already
holding every uploaded object, and returns that instead of committing twice. The Hub rate-limits commits,
which is one more reason to make exactly one.

Every request has a timeout (``RECAST_HF_TIMEOUT_S``): huggingface_hub's shared client has none (and
its tree listings pass ``timeout=None``), so a stalled Hub would hold a worker forever.
"""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from itertools import islice
from pathlib import Path
from urllib.parse import quote

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, set_client_factory
from huggingface_hub import __version__ as hf_version
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.lfs import UploadInfo
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, paginate
from huggingface_hub.utils._http import default_client_factory

from worker.engine.errors import CheckpointError, RecastError
from worker.engine.storage import check_relative

from . import Receipt, TransientStorageError, check_range, publish_order
from .listed import ListedSource
from .locations import Location
from .settings import StoreSettings

_CONNECT_TIMEOUT = 10.0
# Commits publish looks through for its own, newest first: those made after it by others, and its own.
RECENT_COMMITS = 20
# What preupload_lfs_files sets on the CommitOperationAdd it uploaded, and create_commit reads (2.4.0).
_PREUPLOAD_MARKS = frozenset({"_upload_mode", "_should_ignore", "_is_uploaded"})
_client_timeout: float | None = None
_client_lock = threading.Lock()
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


def _timeout(seconds: float) -> httpx2.Timeout:
    return httpx2.Timeout(seconds, connect=min(seconds, _CONNECT_TIMEOUT))


def _bound_requests(seconds: float) -> None:
    """Give every request on huggingface_hub's shared client a timeout of ``seconds`` (once per process).

    A client default is not enough: huggingface_hub passes ``timeout=None`` explicitly on tree listings,
    which httpx2 takes as "wait forever", so a request hook fills in every phase left unbounded. Calls that
    huggingface_hub retries itself (tree listings, preupload, LFS transfers: 5 retries with backoff) then
    take at most six timeouts plus 23 s of backoff; a commit is never retried, so it fails after one.
    """
    global _client_timeout
    with _client_lock:
        if _client_timeout == seconds:
            return
        bounded = _timeout(seconds).as_dict()

        def bound(request: httpx2.Request) -> None:
            given = request.extensions.get("timeout", {})
            request.extensions = {
                **request.extensions,
                "timeout": {k: v if given.get(k) is None else given[k] for k, v in bounded.items()},
            }

        def factory() -> httpx2.Client:
            client = default_client_factory()
            client.event_hooks["request"].append(bound)
            return client

        set_client_factory(factory)
        _client_timeout = seconds


def _api(settings: StoreSettings, credential: str | None) -> tuple[HfApi, str | None]:
    _bound_requests(settings.hf_timeout_s)
    token = settings.credential(credential, "hf").get("token")
    return HfApi(endpoint=settings.hf_endpoint, token=token), token


def resolve_commit(loc: Location, settings: StoreSettings, credential: str | None) -> str:
    """The commit SHA that ``loc``'s revision (default ``main``) points at now."""
    api, _ = _api(settings, credential)
    with _translated(loc.url, credential, CheckpointError):
        info = api.model_info(loc.root, revision=loc.revision or "main")
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
            timeout=_timeout(settings.hf_timeout_s),
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


def preuploaded(name: str, sha256: str, size: int) -> CommitOperationAdd:
    """A ``CommitOperationAdd`` for an LFS object that another process uploaded, built without its file.

    huggingface_hub 2.x has no public way to do this: ``preupload_lfs_files`` marks the very operation
    object it uploaded (``_upload_mode="lfs"``, ``_is_uploaded=True``; ``upload_info`` holds the SHA-256 and
    size), and ``create_commit`` then skips the upload and sends only an ``lfsFile`` line with path,
    SHA-256 and size. Those marks are set here by hand, on an operation whose content is empty; checked
    against huggingface_hub 2.4.0, and refused if a later version renames them.
    """
    if missing := _PREUPLOAD_MARKS - {f.name for f in dataclasses.fields(CommitOperationAdd)}:
        raise RecastError(
            f"huggingface_hub {hf_version} changed CommitOperationAdd (no {', '.join(sorted(missing))}), "
            "through which Recast commits preuploaded files; install huggingface_hub 2.4"
        )
    operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
    operation.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
    operation._upload_mode = "lfs"
    operation._should_ignore = False
    operation._is_uploaded = True
    return operation


class HubTarget:
    """A model repo (branch ``main`` unless the URL names one), written in one commit or pull request."""

    def __init__(
        self,
        loc: Location,
        settings: StoreSettings,
        job_id: str,
        credential: str | None = None,
        create_pr: bool = False,
    ):
        self.api, _ = _api(settings, credential)
        self.repo = loc.root
        self.revision = loc.revision or "main"
        self.endpoint = settings.hf_endpoint
        self.job_id = job_id
        self._signature = f"Converted by Recast, job {job_id}."  # how publish knows its own commit again
        self.create_pr = create_pr
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

    def holds(self, name: str) -> bool:
        """Whether the branch has a file ``name`` now (a model card, before it is replaced)."""
        with self._errors():
            return self.api.file_exists(
                self.repo, check_relative(name, self.description), revision=self.revision
            )

    def local_dir(self) -> None:
        """The Hub has no local filesystem: files are written to scratch and uploaded by ``stage_file``."""
        return None

    def open_stream(self, name: str, size: int) -> None:
        """None: an LFS upload is addressed by the file's SHA-256, known only once the file is whole."""
        return None

    def stage_file(self, name: str, path: Path, sha256: str) -> Receipt:
        """Upload ``path`` as an LFS object (no commit yet), or keep a regular file's content in the receipt."""
        operation = CommitOperationAdd(
            path_in_repo=check_relative(name, self.description), path_or_fileobj=str(path)
        )
        operation.upload_info.sha256 = bytes.fromhex(sha256)  # known already: not read again to hash it
        with self._errors():
            self.api.preupload_lfs_files(
                self.repo, [operation], revision=self.revision, create_pr=self.create_pr
            )
        if operation._should_ignore:
            raise RecastError(
                f"{self.description}: the repository's .gitignore excludes {name}; remove that rule first"
            )
        receipt: Receipt = {
            "lfs": operation._upload_mode == "lfs",
            "sha256": sha256,
            "size": operation.upload_info.size,
        }
        if not receipt["lfs"]:
            receipt["content"] = base64.b64encode(path.read_bytes()).decode("ascii")
        return receipt

    def publish(
        self, staged: dict[str, Receipt], commit_message: str, create_pr: bool, replace: bool = False
    ) -> dict[str, str]:
        """One commit (a pull request if ``create_pr``) from the receipts alone; none if it was made already.
        With ``replace`` the same commit deletes the files the revision holds that the output does not."""
        with self._errors():
            if (done := self._published(staged, create_pr)) is not None:
                return done
            stale = []
            if replace:
                tree = self.api.list_repo_tree(self.repo, revision=self.revision, recursive=True)
                stale = [
                    CommitOperationDelete(path_in_repo=e.path)
                    for e in tree
                    if isinstance(e, RepoFile) and e.path not in staged and e.path != ".gitattributes"
                ]
            operations = [
                preuploaded(name, staged[name]["sha256"], staged[name]["size"])
                if staged[name]["lfs"]
                else CommitOperationAdd(
                    path_in_repo=name, path_or_fileobj=base64.b64decode(staged[name]["content"])
                )
                for name in publish_order(list(staged))
            ] + stale
            info = self.api.create_commit(
                self.repo,
                operations,
                commit_message=commit_message,
                commit_description=self._signature,
                revision=self.revision,
                create_pr=create_pr,
            )
        result = {"url": f"hf://{self.repo}@{info.oid}", "commit": info.oid}
        if info.pr_url:
            result["pr_url"] = info.pr_url
        return result

    def _published(self, staged: dict[str, Receipt], create_pr: bool) -> dict[str, str] | None:
        """The result of an earlier publish of these receipts, found on the Hub, or None.

        That commit is this job's (its description names the job: a later job whose output is the same
        bytes still makes its own, with its own recast.json), among the branch's or a pull request's
        latest ``RECENT_COMMITS`` (someone may have committed after it), and holds the output: every
        staged name, each LFS file with its receipt's SHA-256 (regular files may differ, as a retried
        finalize writes recast.json anew). Without LFS files there is nothing to recognise, and for a
        branch huggingface_hub already drops files that did not change.
        """
        lfs = {name: r["sha256"] for name, r in staged.items() if r["lfs"]}
        if not lfs:
            return None

        def ours(revision: str) -> str | None:
            """This job's commit among the latest at ``revision``: one page of the history, not all of it
            (``HfApi.list_repo_commits`` follows every page)."""
            url = f"{self.endpoint}/api/models/{self.repo}/commits/{quote(revision, safe='')}"
            recent = islice(
                paginate(url, params={}, headers=build_hf_headers(token=self.api.token)), RECENT_COMMITS
            )
            return next((c["id"] for c in recent if self._signature in f"{c['title']}\n{c['message']}"), None)

        def holds(commit: str) -> bool:
            tree = self.api.list_repo_tree(self.repo, revision=commit, recursive=True)
            files = {e.path: e for e in tree if isinstance(e, RepoFile)}
            return staged.keys() <= files.keys() and all(
                (lfs_info := files[name].lfs) is not None and lfs_info.sha256 == sha
                for name, sha in lfs.items()
            )

        if not create_pr:
            commit = ours(self.revision)
            return (
                {"url": f"hf://{self.repo}@{commit}", "commit": commit} if commit and holds(commit) else None
            )
        pulls = self.api.list_repo_refs(self.repo, include_pull_requests=True).pull_requests or []
        for ref in sorted(pulls, key=lambda r: int(r.ref.rsplit("/", 1)[-1]), reverse=True):
            if (commit := ours(ref.ref)) and holds(commit):
                number = ref.ref.rsplit("/", 1)[-1]
                return {
                    "url": f"hf://{self.repo}@{commit}",
                    "commit": commit,
                    "pr_url": f"{self.endpoint}/{self.repo}/discussions/{number}",
                }
        return None

    def discard(self, staged: dict[str, Receipt] | None = None) -> None:
        """Nothing to remove: uploaded objects are in no commit (see the module docstring)."""
