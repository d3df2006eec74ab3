"""A fake Hugging Face hub on 127.0.0.1 that serves one folder as a model repository, through the endpoints
huggingface_hub 2.4 uses (hf_api.py model_info / list_repo_tree, file_download.py get_hf_file_metadata / http_get):

  GET  /api/models/<repo>/revision/<rev>[?blobs=true]  model info: `sha` (the commit) and `siblings` with size, blobId,
                                                      and `lfs` {size, sha256, pointerSize} for the weights
  GET  /api/models/<repo>/tree/<rev>?recursive=...    the tree listing snapshot_download reads (one page: no Link)
  HEAD /<repo>/resolve/<rev>/<file>                   X-Repo-Commit, ETag (the LFS sha256 for weights, the git blob sha1
                                                      otherwise), Content-Length, Accept-Ranges
  GET  /<repo>/resolve/<rev>/<file>                   the bytes; `Range: bytes=N-` answers 206 with Content-Range
An unknown repo or file is a 404 with X-Error-Code (RepoNotFound / EntryNotFound), as the hub answers.

Faults, each on the first GET of the file only: `stall_after={file: n}` sends n bytes, then nothing until the server
stops (the client is killed mid-file); `drop_after={file: n}` sends n bytes and closes the connection.
`.requests` records (method, path, Range header) of every request, for the tests to count.

Run: python -m tests.fakes.hf_hub --folder <model folder> --repo owner/name --port 8766
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Start with .start() (or `with`); .endpoint for HF_ENDPOINT; .gets(file) counts the GETs of a file."""

    def __init__(self, folder, repo_id: str = "medllm-test/tiny-qwen2", port: int = 0,
                 stall_after: dict | None = None, drop_after: dict | None = None):
        self.folder, self.repo_id, self.port = Path(folder), repo_id, port
        self.files = {p.relative_to(self.folder).as_posix(): p.read_bytes()
                      for p in sorted(self.folder.rglob("*")) if p.is_file()}
        self.commit = hashlib.sha1(json.dumps({n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()},
                                              sort_keys=True).encode()).hexdigest()
        self.stall_after, self.drop_after = dict(stall_after or {}), dict(drop_after or {})
        self.requests: list[tuple[str, str, str | None]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- what the hub says about a file --------------------------------------------------------------------
    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def etag(self, name: str) -> str:
        return self.sha256(name) if name.endswith(LFS_SUFFIXES) else git_blob_sha1(self.files[name])

    def _lfs(self, name: str, sha_key: str) -> dict | None:
        if not name.endswith(LFS_SUFFIXES):
            return None
        return {"size": len(self.files[name]), sha_key: self.sha256(name), "pointerSize": 134}

    def model_info(self) -> dict:
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False, "gated": False,
                "siblings": [{"rfilename": n, "size": len(b), "blobId": git_blob_sha1(b), "lfs": self._lfs(n, "sha256")}
                             for n, b in self.files.items()]}

    def tree(self) -> list[dict]:
        out = []
        for n, b in self.files.items():
            entry = {"type": "file", "oid": git_blob_sha1(b), "size": len(b), "path": n}
            if (lfs := self._lfs(n, "oid")) is not None:
                entry["lfs"] = lfs
            out.append(entry)
        return out

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of `name` (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and re.search(rf"/resolve/[^/]+/{re.escape(name)}$", p)]

    # ---- server --------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def first_get(self, name: str) -> bool:
        with self._lock:
            return len(self.gets(name)) == 1


def _handler(hub: FakeHub):
    repo = re.escape(hub.repo_id)
    info_re = re.compile(rf"^/api/models/{repo}/revision/([^/]+)$")
    tree_re = re.compile(rf"^/api/models/{repo}/tree/([^/]+)$")
    resolve_re = re.compile(rf"^/{repo}/resolve/([^/]+)/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):   # quiet
            pass

        def _json(self, obj, status=200):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str):
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self):
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            if self.command == "GET" and info_re.match(path):
                return self._json(hub.model_info())
            if self.command == "GET" and tree_re.match(path):
                return self._json(hub.tree())
            m = resolve_re.match(path)
            if m and m.group(2) in hub.files:
                return self._file(m.group(2))
            if m and path.startswith(f"/{hub.repo_id}/"):
                return self._error(404, "EntryNotFound")
            return self._error(404, "RepoNotFound")

        def _file(self, name: str):
            data = hub.files[name]
            start = 0
            rng = self.headers.get("Range")
            if rng and (r := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
                start = int(r.group(1))
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("ETag", f'"{hub.etag(name)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            first = hub.first_get(name)
            if first and name in hub.stall_after:
                self.wfile.write(body[: hub.stall_after[name]])
                self.wfile.flush()
                hub.stopping.wait(60)     # the client is killed meanwhile
                self.close_connection = True
                return
            if first and name in hub.drop_after:
                self.wfile.write(body[: hub.drop_after[name]])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        do_GET = do_HEAD = _route

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--repo", default="medllm-test/tiny-qwen2")
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    hub = FakeHub(args.folder, args.repo, args.port).start()
    print(f"fake hub for {hub.repo_id} at {hub.endpoint} (HF_ENDPOINT={hub.endpoint})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()


def stage_env(monkeypatch, root: Path, hub: FakeHub, probe: str = "h100_80g", **extra) -> Path:
    """The environment of a GPU-tier download through the fake (on top of conftest's tiny_env): MODEL_TIER=7b planned
    from a recorded probe (no torch import), MODEL_NAME the fake's repo, HF_ENDPOINT the fake, HF_HOME under root.
    huggingface_hub's own offline switch (make test exports HF_HUB_OFFLINE=1) is turned off. Returns the HF cache."""
    import huggingface_hub.constants as constants
    values = {"PIPELINE_ROOT": str(root), "MODEL_TIER": "7b", "GPU_PROBE_FILE": f"configs/probes/{probe}.json",
              "MODEL_NAME": hub.repo_id, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(root / "hf"),
              "HF_HUB_OFFLINE": "0", **extra}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", values["HF_HUB_OFFLINE"] in ("1", "true"))
    return Path(values["HF_HOME"]) / "hub"
