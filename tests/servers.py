"""Real servers on loopback for the store tests: moto's S3 server and a small Hugging Face Hub.

Both run in threads of the test process and are reached over TCP, so boto3 and huggingface_hub run
their real HTTP stacks (huggingface_hub 2.x uses httpx2, which respx-style mocks do not intercept).
The Hub server speaks the slice of the Hub API that huggingface_hub 2.4 calls for model_info, tree
listings, refs (with pull requests), ``resolve`` (with ``Range``, and a redirect to a "CDN" origin for LFS
files, as on the Hub), ``preupload_lfs_files`` (the preupload endpoint, the LFS batch API with the basic
transfer, upload and verify), ``create_commit`` (NDJSON commit with inline and ``lfsFile`` lines, pull
requests) and the check of a README.md's metadata that precedes a commit holding one (``validate-yaml``:
the front matter must be a YAML mapping and ``base_model_relation`` one of the Hub's values). Faults and
stalls can be injected per path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest
import yaml

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# The values the Hub accepts for a model card's base_model_relation.
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server; dummy AWS credentials are in the environment for the session."""
    env = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.delenv(name, raising=False)
    for name, value in AWS_TEST_ENV.items():
        env.setenv(name, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from moto.server import ThreadedMotoServer  # only here: the GPU machine runs the suite without moto

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        env.undo()


def upload_directory(endpoint_url: str, path: Path, bucket: str, prefix: str = "") -> list[str]:
    """Upload every file under ``path`` to ``s3://bucket/prefix/`` (creating the bucket); returns the keys."""
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    keys = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        key = base + file.relative_to(path).as_posix()
        client.upload_file(str(file), bucket, key)
        keys.append(key)
    return keys


class _Repo:
    def __init__(self, private: bool, token: str | None):
        self.private = private
        self.token = token
        self.commits: dict[str, dict[str, bytes]] = {}
        self.history: dict[str, tuple[str | None, str, str]] = {}  # sha -> (parent, title, message)
        self.refs: dict[str, str] = {}
        self.pulls = 0


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def _blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubServer:
    """The Hub on ``endpoint``; LFS files redirect to ``cdn`` (same server, other origin: localhost)."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.faults: dict[str, int] = {}  # path -> HTTP status to answer instead (e.g. 503)
        self.stalls: dict[str, float] = {}  # path -> seconds to wait before answering
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.cdn = f"http://localhost:{port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_repo(
        self, repo_id: str, path: Path | None = None, private: bool = False, token: str | None = None
    ) -> str:
        """Register ``repo_id`` with the files under ``path`` as the first commit of ``main``; return its SHA.

        A private repo answers reads only with ``Authorization: Bearer <token>``; writes need the token
        whenever one is set.
        """
        files = {}
        if path is not None:
            files = {
                p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            }
        files.setdefault(".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        repo = _Repo(private, token)
        with self.lock:
            self.repos[repo_id] = repo
            sha = self._commit(repo, None, files)
            repo.refs["main"] = sha
        return sha

    def add_commit(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Push ``files`` (added or replaced) onto ``main`` as someone else's commit; returns its SHA."""
        repo = self.repos[repo_id]
        with self.lock:
            head = repo.refs["main"]
            repo.refs["main"] = sha = self._commit(repo, head, {**repo.commits[head], **files})
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.refs.get(revision, revision)])

    def _commit(
        self, repo: _Repo, parent: str | None, files: dict[str, bytes], title: str = "", message: str = ""
    ) -> str:
        for path, content in files.items():
            if _is_lfs(path):
                self.lfs[hashlib.sha256(content).hexdigest()] = content
        digest = hashlib.sha1(f"{parent}:{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.history[sha] = (parent, title, message)
        return sha


class _Reply(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code header where the client relies on it."""

    def __init__(self, status: int, error_code: str | None = None, message: str = ""):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test log records requests in ``hub.log`` instead."""

        def do_GET(self) -> None:
            self._dispatch(body=True)

        def do_HEAD(self) -> None:
            self._dispatch(body=False)

        def do_POST(self) -> None:
            self._dispatch(body=True)

        def do_PUT(self) -> None:
            self._dispatch(body=True)

        def _dispatch(self, body: bool) -> None:
            url = urlsplit(self.path)
            segments = [unquote(s) for s in url.path.split("/")[1:]]
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with hub.lock:
                hub.log.append((self.command, url.path, self.headers.get("Authorization")))
            # Read the whole request body first: on a kept-alive connection the next request follows it.
            self.payload = self._body() if self.command in ("POST", "PUT") else b""
            time.sleep(hub.stalls.get(url.path, 0))
            try:
                if (status := hub.faults.get(url.path)) is not None:
                    raise _Reply(status, None, "injected fault")
                self._route(segments, query, body)
            except _Reply as reply:
                payload = json.dumps({"error": reply.message}).encode()
                headers = {"Content-Type": "application/json"}
                if reply.error_code:
                    headers["X-Error-Code"] = reply.error_code
                if reply.message:
                    headers["X-Error-Message"] = reply.message
                self._send(reply.status, payload, headers, body)

        def _route(self, seg: list[str], query: dict[str, str], body: bool) -> None:
            method = self.command
            if seg[:2] == ["api", "models"] and len(seg) >= 4:
                repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
                if method == "GET" and (not rest or rest[0] == "revision"):
                    return self._model_info(repo_id, "/".join(rest[1:]) or "main", query)
                if method == "GET" and rest[:1] == ["tree"]:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id, query)
                if method == "GET" and rest[:1] == ["commits"]:
                    return self._commits(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id, rest[1])
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, rest[1], query)
            if (
                method == "POST"
                and len(seg) == 6
                and seg[1].endswith(".git")
                and seg[2:]
                == [
                    "info",
                    "lfs",
                    "objects",
                    "batch",
                ]
            ):
                return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}")
            if method == "PUT" and seg[0] == "lfs-upload":
                return self._lfs_upload(seg[1])
            if method == "POST" and seg == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if method == "POST" and seg[0] == "lfs-verify" and seg[1] in hub.lfs:
                return self._send_json({"ok": True})
            if method in ("GET", "HEAD") and seg[0] == "cdn" and seg[1] in hub.lfs:
                return self._serve(hub.lfs[seg[1]], {}, body)
            if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
                return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), body)
            raise _Reply(404, message=f"no route for {method} {self.path}")

        # -- access ------------------------------------------------------------------------------

        def _repo(self, repo_id: str, write: bool = False) -> _Repo:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise _Reply(404, "RepoNotFound", "Repository not found")
            authorized = repo.token is None or self.headers.get("Authorization") == f"Bearer {repo.token}"
            if repo.private and not authorized:
                raise _Reply(401, "RepoNotFound", "Invalid username or password.")
            if write and not authorized:
                raise _Reply(403, None, "You don't have the rights to create a commit here")
            return repo

        @staticmethod
        def _sha(repo: _Repo, revision: str) -> str:
            sha = repo.refs.get(revision, revision if revision in repo.commits else None)
            if sha is None:
                raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        # -- reads -------------------------------------------------------------------------------

        def _model_info(self, repo_id: str, revision: str, query: dict[str, str]) -> None:
            repo = self._repo(repo_id)
            sha = self._sha(repo, revision)
            siblings = []
            for path, content in sorted(repo.commits[sha].items()):
                sibling: dict[str, object] = {"rfilename": path}
                if query.get("blobs", "").lower() == "true":
                    sibling.update(size=len(content), blobId=_blob_oid(content))
                siblings.append(sibling)
            self._send_json(
                {"_id": repo_id, "id": repo_id, "private": repo.private, "sha": sha, "siblings": siblings}
            )

        def _tree(self, repo_id: str, revision: str, under: str, query: dict[str, str]) -> None:
            repo = self._repo(repo_id)
            files = repo.commits[self._sha(repo, revision)]
            recursive = query.get("recursive", "").lower() == "true"
            base = f"{under}/" if under else ""
            entries, dirs = [], set()
            for path, content in sorted(files.items()):
                if not path.startswith(base):
                    continue
                parts = path[len(base) :].split("/")
                for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                    dirs.add(base + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    entry = {"type": "file", "oid": _blob_oid(content), "size": len(content), "path": path}
                    if _is_lfs(path):
                        oid = hashlib.sha256(content).hexdigest()
                        entry["lfs"] = {"oid": oid, "size": len(content), "pointerSize": 134}
                    entries.append(entry)
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
            self._send_json(entries)

        def _refs(self, repo_id: str, query: dict[str, str]) -> None:
            repo = self._repo(repo_id)
            refs: dict[str, list[dict[str, str]]] = {
                "branches": [],
                "converts": [],
                "tags": [],
                "pullRequests": [],
            }
            for name, sha in sorted(repo.refs.items()):
                if name.startswith("refs/pr/"):
                    if query.get("include_prs") == "1":
                        refs["pullRequests"].append({"name": name, "ref": name, "targetCommit": sha})
                else:
                    refs["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha})
            self._send_json(refs)

        def _commits(self, repo_id: str, revision: str) -> None:
            """The commits reachable from ``revision``, newest first, in one page."""
            repo = self._repo(repo_id)
            sha: str | None = self._sha(repo, revision)
            out = []
            while sha is not None:
                parent, title, message = repo.history[sha]
                date = "2026-01-01T00:00:00.000Z"
                out.append({"id": sha, "title": title, "message": message, "authors": [], "date": date})
                sha = parent
            self._send_json(out)

        def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
            repo = self._repo(repo_id)
            sha = self._sha(repo, revision)
            content = repo.commits[sha].get(path)
            if content is None:
                raise _Reply(404, "EntryNotFound", f"{path} does not exist at {revision}")
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_blob_oid(content)}"'}
            if _is_lfs(path):
                oid = hashlib.sha256(content).hexdigest()
                headers.update({"Location": f"{hub.cdn}/cdn/{oid}", "X-Linked-Size": str(len(content))})
                return self._send(302, b"", headers, body)
            self._serve(content, headers, body)

        def _serve(self, content: bytes, headers: dict[str, str], body: bool) -> None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match is None:
                return self._send(200, content, headers, body)
            first = int(match[1])
            last = min(int(match[2]) if match[2] else len(content) - 1, len(content) - 1)
            if first >= len(content):
                headers["Content-Range"] = f"bytes */{len(content)}"
                return self._send(416, b"", headers, body)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
            self._send(206, content[first : last + 1], headers, body)

        # -- commits -----------------------------------------------------------------------------

        def _preupload(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, write=True)
            self._sha(repo, revision)
            files = json.loads(self.payload)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if _is_lfs(f["path"]) else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            self._send_json({"files": modes, "commitOid": repo.refs.get(revision)})

        def _lfs_batch(self, repo_id: str) -> None:
            self._repo(repo_id, write=True)
            request = json.loads(self.payload)
            objects = []
            for obj in request["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:
                    answer["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/lfs-verify/{obj['oid']}"},
                    }
                objects.append(answer)
            self._send_json({"transfer": "basic", "objects": objects})

        def _lfs_upload(self, oid: str) -> None:
            content = self.payload
            if hashlib.sha256(content).hexdigest() != oid:
                raise _Reply(400, None, "content does not match its oid")
            with hub.lock:
                hub.lfs[oid] = content
            self._send(200, b"", {}, True)

        def _commit(self, repo_id: str, revision: str, query: dict[str, str]) -> None:
            repo = self._repo(repo_id, write=True)
            parent = self._sha(repo, revision)
            files = dict(repo.commits[parent])
            title = message = ""
            for line in self.payload.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    title, message = value.get("summary", ""), value.get("description", "")
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        raise _Reply(422, None, f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                else:
                    raise _Reply(400, None, f"unsupported commit operation {item['key']}")
            with hub.lock:
                sha = hub._commit(repo, parent, files, title, message)
                pr_url = None
                if query.get("create_pr") == "1":
                    repo.pulls += 1
                    repo.refs[f"refs/pr/{repo.pulls}"] = sha
                    pr_url = f"{hub.endpoint}/{repo_id}/discussions/{repo.pulls}"
                else:
                    repo.refs[revision] = sha
            commit_url = f"{hub.endpoint}/{repo_id}/commit/{sha}"
            self._send_json({"commitUrl": commit_url, "commitOid": sha, "pullRequestUrl": pr_url})

        def _validate_yaml(self) -> None:
            content = json.loads(self.payload)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match[1]) if match else {}
            except yaml.YAMLError as exc:
                return self._send_json({"errors": [{"message": f"invalid YAML: {exc}"}]}, 400)
            if not isinstance(meta, dict):
                return self._send_json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
            relation = meta.get("base_model_relation")
            if relation is not None and relation not in HUB_RELATIONS:
                return self._send_json({"errors": [{"message": f"base_model_relation {relation!r}"}]}, 400)
            self._send_json({})

        # -- plumbing ----------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _send_json(self, data: object, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"}, True)

        def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A loopback Hub; huggingface_hub is pointed at it per call with ``HfApi(endpoint=hub.endpoint)``.

    For the session: no ambient token (so a test's token is the only one sent), offline mode off (the
    loopback Hub is reachable even where the real one is not), and Xet uploads off, because uploading
    through Xet needs its content-addressed storage service, which this server does not implement.
    """
    from huggingface_hub import constants

    env = pytest.MonkeyPatch()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.delenv(name, raising=False)
    env.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf-home") / "token"))
    env.setattr(constants, "HF_HUB_OFFLINE", False)
    env.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub = HubServer()
    hub.thread.start()
    try:
        yield hub
    finally:
        hub.httpd.shutdown()
        hub.httpd.server_close()
        env.undo()
