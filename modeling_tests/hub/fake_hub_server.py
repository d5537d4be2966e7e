"""A stand-in Hugging Face Hub on 127.0.0.1 (stdlib only) for offline push/pull round trips.

The endpoints and answers `huggingface_hub` needs for an upload and a download, verified against its client,
plus `POST .../branch/{name}` (for `--revision`), a port chosen by the OS and written to a file (no port races), and a
bounded lifetime so a crashed test run never leaves it behind. Storage ignores revisions: every branch sees one tree.

Run: `python fake_hub_server.py STORE_DIR PORT_FILE [LIFETIME_SECONDS]`; requests are logged to stderr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0" * 40
STORE = "."


def repo_dir(repo_id: str) -> str:
    return os.path.join(STORE, repo_id.replace("/", "__"))


class FakeHubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        print("REQ", self.command, self.path, file=sys.stderr, flush=True)

    def _send(self, code, body=b"", headers=None, ctype="application/json"):
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def do_POST(self):
        path = urllib.parse.urlparse(self.path).path
        body = self._body()
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            data = json.loads(body or b"{}")
            name = data["name"]
            repo_id = name if "/" in name else f"{data.get('organization') or 'user'}/{name}"
            os.makedirs(repo_dir(repo_id), exist_ok=True)
            return self._send(200, {"url": f"{self._base_url()}/{repo_id}", "name": repo_id, "id": repo_id})
        parts = path.strip("/").split("/")  # api/models/ns/name/(preupload|commit|branch)/rev
        if len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._send(200, {"files": answer})
        if len(parts) >= 6 and parts[0] == "api" and parts[4] == "branch":
            return self._send(200, {})
        if len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
            return self._commit(f"{parts[2]}/{parts[3]}", body)
        return self._send(404, {"error": "not implemented"}, {"X-Error-Code": "RepoNotFound"})

    def _commit(self, repo_id: str, body: bytes):
        for line in body.decode().splitlines():
            item = json.loads(line) if line.strip() else {}
            if item.get("key") == "file":
                target = os.path.join(repo_dir(repo_id), item["value"]["path"])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as handle:
                    handle.write(base64.b64decode(item["value"]["content"]))
            elif item.get("key") == "deletedFile":
                target = os.path.join(repo_dir(repo_id), item["value"]["path"])
                if os.path.isfile(target):
                    os.remove(target)
        url = f"{self._base_url()}/{repo_id}/commit/{COMMIT}"
        return self._send(200, {"commitUrl": url, "commitOid": COMMIT, "pullRequestUrl": None})

    def do_GET(self):
        parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":  # ns/name/resolve/rev/file
            return self._resolve(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]))
        if len(parts) >= 6 and parts[0] == "api" and parts[4] == "tree":  # api/models/ns/name/tree/rev[/path]
            return self._tree(f"{parts[2]}/{parts[3]}", "/".join(parts[6:]))
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":  # api/models/ns/name[/revision/rev]
            repo_id = f"{parts[2]}/{parts[3]}"
            if not os.path.isdir(repo_dir(repo_id)):
                return self._send(404, {}, {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": f} for f in sorted(os.listdir(repo_dir(repo_id)))]
            return self._send(200, {"id": repo_id, "sha": COMMIT, "private": False, "siblings": siblings})
        return self._send(404, {"error": "not implemented"}, {"X-Error-Code": "EntryNotFound"})

    do_HEAD = do_GET

    def _resolve(self, repo_id: str, filename: str):
        if not os.path.isdir(repo_dir(repo_id)):
            return self._send(404, {}, {"X-Error-Code": "RepoNotFound"})
        path = os.path.join(repo_dir(repo_id), filename)
        if not os.path.isfile(path):
            return self._send(404, {}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        with open(path, "rb") as handle:
            data = handle.read()
        headers = {"ETag": '"' + hashlib.sha1(data).hexdigest() + '"', "X-Repo-Commit": COMMIT}
        return self._send(200, data, headers, "application/octet-stream")

    def _tree(self, repo_id: str, sub: str):
        base = os.path.join(repo_dir(repo_id), sub)
        entries = []
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            full, rel = os.path.join(base, name), (f"{sub}/{name}" if sub else name)
            if os.path.isdir(full):
                entries.append({"type": "directory", "path": rel, "oid": COMMIT, "size": 0})
            else:
                with open(full, "rb") as handle:
                    data = handle.read()
                entries.append({"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        return self._send(200, entries)


def serve(store: str, port_file: str, lifetime: float = 300.0) -> None:
    """Serve on a free port, publish the port through `port_file`, stop after `lifetime` seconds."""
    global STORE
    STORE = store
    os.makedirs(store, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    timer = threading.Timer(lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    partial = port_file + ".partial"
    with open(partial, "w") as handle:
        handle.write(str(server.server_address[1]))
    os.replace(partial, port_file)
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 300.0)
