"""A stand-in for the Hugging Face Hub on the loopback: the few endpoints huggingface_hub's
snapshot_download calls for a dataset repo (its revision, its file tree, each file's metadata
and bytes, with HTTP ranges, with which huggingface_hub retries a dropped transfer). Point
HF_ENDPOINT at `url`.

`stall=(file, n)` makes the first transfer of that file stop after n bytes and hang (as a
dropped connection does) until the client goes away; `stalled` is set once it does.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"


class HubStandIn:
    def __init__(self, repo_id: str, files: dict[str, bytes], stall: tuple[str, int] | None = None):
        self.repo_id, self.files, self.stall = repo_id, files, stall
        self.stalled = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stall = None
        self.server.shutdown()
        self.server.server_close()

    def tree(self) -> list[dict]:
        return [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                 "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                for name, data in sorted(self.files.items())]  # fmt: skip

    def _handler(self):
        hub = self
        api = re.compile(rf"/api/datasets/{re.escape(hub.repo_id)}/(revision|tree)/[^/?]+")
        resolve = re.compile(rf"/datasets/{re.escape(hub.repo_id)}/resolve/[^/]+/(.+)")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.respond(body=True)

            def do_HEAD(self):
                self.respond(body=False)

            def respond(self, body: bool):
                path = self.path.split("?")[0]
                if found := api.fullmatch(path):
                    info = {"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]}
                    return self.send(200, json.dumps(info if found[1] == "revision" else hub.tree()).encode())
                found = resolve.fullmatch(path)
                if not found or found[1] not in hub.files:
                    return self.send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
                data = hub.files[found[1]]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}  # fmt: skip
                if not body:
                    return self.send(200, b"", headers, length=len(data))
                start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-")[1])
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                stall = hub.stall[1] if hub.stall and hub.stall[0] == found[1] else None
                self.send(206 if start else 200, data[start:], headers, stall=stall)

            def send(self, status, data, headers=None, length=None, stall=None):
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if stall is None:
                    self.wfile.write(data)
                    return
                hub.stall = None  # the first transfer only
                self.wfile.write(data[:stall])
                self.wfile.flush()
                hub.stalled.set()
                # hang, as a dead link does, until the client is gone (its socket then reads EOF)
                self.connection.settimeout(None)
                while self.connection.recv(1):
                    pass

        return Handler
