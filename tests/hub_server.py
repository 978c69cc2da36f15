"""A small Hub-compatible HTTP server for the tests (standard library only, 127.0.0.1).

It answers the calls huggingface_hub and diffusers make to create a repo, upload a folder in one
commit (regular and LFS files) and download it again (see ../shared/docs/hub-protocol.md). Repos live
in memory. `refuse` makes chosen calls fail with a status code, to test error handling.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".pth", ".pkl")


@dataclass
class Repo:
    private: bool
    commits: list[str] = field(default_factory=list)
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    branch_heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files
    lfs_paths: set[str] = field(default_factory=set)
    sdk: str | None = None  # a Space's SDK (gradio, docker, static)


class HubState:
    """The server's repos and LFS store, plus the failures it is told to make."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}  # model repos
        self.spaces: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.refuse: dict[str, int] = {}  # call name ("create", "commit", "lfs", "whoami", ...) -> status
        self.calls: list[str] = []
        self.lock = threading.Lock()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, content_type="application/json"):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _refused(self, call: str, head: bool = False) -> bool:
        state = self.server.state
        state.calls.append(call)
        status = state.refuse.get(call)
        if status is None:
            return False
        self._error(status, f"refused by the test server ({call})", head=head)
        return True

    # -- routing ----------------------------------------------------------------------------------
    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def _route(self, method: str):
        body = self._body() if method in ("POST", "PUT") else b""
        path = unquote(urlparse(self.path).path)
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/(?P<kind>models|spaces)/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self.preupload),
            ("POST", r"/api/(?P<kind>models|spaces)/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self.create_branch),
            ("POST", r"/(?:(?P<kind>spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
            ("POST", r"/api/(?P<kind>models|spaces)/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self.commit),
            ("GET", r"/api/(?P<kind>models|spaces)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?",
             self.tree),
            ("GET", r"/api/(?P<kind>models|spaces)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?", self.repo_info),
            ("GET", r"/(?:(?P<kind>spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", r"/(?:(?P<kind>spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)",
             self.resolve),
        ]  # fmt: skip
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                with self.server.state.lock:
                    return handler(body=body, head=method == "HEAD", **match.groupdict())
        self._error(404, f"no route for {method} {path}")

    def _repo(self, repo: str, head: bool = False, kind: str | None = "models") -> Repo | None:
        store = self.server.state.spaces if kind == "spaces" else self.server.state.repos
        found = store.get(repo)
        if found is None:
            self._error(404, f"Repository {repo} not found", "RepoNotFound", head=head)
        return found

    def _files_at(self, repo: Repo, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if rev in repo.branches:
            return repo.branch_heads[rev], repo.branches[rev]
        if rev in repo.snapshots:
            return rev, repo.snapshots[rev]
        return None

    # -- endpoints --------------------------------------------------------------------------------
    def whoami(self, body, head):
        if self._refused("whoami"):
            return
        self._json(200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self, body, head):
        if self._refused("create"):
            return
        request = json.loads(body)
        repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
        space = request.get("type") == "space"
        if space and request.get("sdk") not in ("gradio", "docker", "static"):
            return self._error(400, "A Space needs an sdk: gradio, docker or static")
        store = self.server.state.spaces if space else self.server.state.repos
        url = f"{self.server.endpoint}/{'spaces/' if space else ''}{repo_id}"
        if repo_id in store:
            return self._json(
                409, {"error": f"You already created this {'space' if space else 'model'} repo", "url": url}
            )
        private = bool(request.get("private")) or request.get("visibility") == "private"
        store[repo_id] = Repo(private=private, sdk=request.get("sdk") if space else None)
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, body, head):
        self._json(200, {"errors": [], "warnings": []})

    def create_branch(self, body, head, repo, rev, kind="models"):
        found = self._repo(repo, kind=kind)
        if found is None or self._refused("branch"):
            return
        if rev in found.branches:
            return self._error(409, f"Branch {rev} already exists")
        found.branches[rev] = dict(found.branches["main"])
        found.branch_heads[rev] = found.branch_heads["main"]
        self._json(200, {})

    def preupload(self, body, head, repo, rev, kind="models"):
        if self._repo(repo, kind=kind) is None or self._refused("preupload"):
            return
        files = json.loads(body)["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False}
            for f in files
        ]  # fmt: skip
        self._json(200, {"files": modes})

    def lfs_batch(self, body, head, repo, kind=None):
        if self._repo(repo, kind=kind) is None or self._refused("lfs"):
            return
        objects = []
        for item in json.loads(body)["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.server.state.lfs_objects:
                href = f"{self.server.endpoint}/lfs-upload/{item['oid']}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, body, head, oid):
        if self._refused("lfs_upload"):
            return
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 of the body does not match the oid")
        self.server.state.lfs_objects[oid] = body
        self._send(200)

    def commit(self, body, head, repo, rev, kind="models"):
        found = self._repo(repo, kind=kind)
        if found is None or self._refused("commit"):
            return
        if rev not in found.branches:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        files = dict(found.branches[rev])
        lfs_paths = set()
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.server.state.lfs_objects:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.server.state.lfs_objects[value["oid"]]
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
        oid = hashlib.sha1(f"{repo}{rev}{len(found.commits)}{summary}".encode()).hexdigest()
        found.branches[rev] = files
        found.branch_heads[rev] = oid
        found.snapshots[oid] = files
        found.commits.append(oid)
        found.lfs_paths |= lfs_paths
        prefix = "spaces/" if kind == "spaces" else ""
        self._json(200, {"commitUrl": f"{self.server.endpoint}/{prefix}{repo}/commit/{oid}", "commitOid": oid})

    def repo_info(self, body, head, repo, rev=None, kind="models"):
        found = self._repo(repo, kind=kind)
        if found is None or self._refused("info"):
            return
        at = self._files_at(found, rev or "main")
        if at is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        sha, files = at
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())]
        self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": found.private, "siblings": siblings,
                         "tags": [], "downloads": 0, "likes": 0, "library_name": "diffusers"})  # fmt: skip

    def tree(self, body, head, repo, rev, sub=None, kind="models"):
        found = self._repo(repo, kind=kind)
        if found is None:
            return
        at = self._files_at(found, rev)
        if at is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        prefix = (sub.rstrip("/") + "/") if sub else ""
        entries, folders = [], set()
        for path, data in sorted(at[1].items()):
            if not path.startswith(prefix):
                continue
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(parts[:depth]))
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if path in found.lfs_paths:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
            entries.append(entry)
        entries += [{"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)
                    if folder.startswith(prefix)]  # fmt: skip
        self._json(200, entries)

    def resolve(self, body, head, repo, rev, file, kind=None):
        found = self._repo(repo, head=head, kind=kind)
        if found is None or self._refused("download", head=head):
            return
        at = self._files_at(found, rev)
        if at is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound", head=head)
        sha, files = at
        if file not in files:
            return self._error(404, f"Entry {file} not found", "EntryNotFound", head=head)
        data = files[file]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if file in found.lfs_paths:
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        self._send(200, data, headers, head=head)
