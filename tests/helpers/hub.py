"""A stand-in for the Hugging Face Hub on the loopback: the few endpoints huggingface_hub's
snapshot_download calls for a dataset repo (its revision, its file tree, each file's metadata
and bytes, with HTTP ranges, with which huggingface_hub retries a dropped transfer). Point
HF_ENDPOINT at `url`.

`published(...)` lays a dataset out as the hub's parquet datasets are (one folder per config,
a file per split, the configs declared in the README's YAML header), which `datasets` reads.

`stall=(file, n)` makes the first transfer of that file stop after n bytes and hang (as a
dropped connection does) until the client goes away; `stalled` is set once it does.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"


def published(configs: dict[str, dict[str, list[dict]]]) -> dict[str, bytes]:
    """{config: {split: rows}} as a hub dataset repo's files: <config>/<split>-00000-of-00001.parquet
    and a README declaring them (the layout of openai/gsm8k, allenai/ai2_arc, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, header = {}, ["---", "configs:"]
    for config, splits in configs.items():
        header += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buffer)
            files[f"{config}/{split}-00000-of-00001.parquet"] = buffer.getvalue()
            header += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    files["README.md"] = "\n".join([*header, "---", "# a stand-in", ""]).encode()
    return files


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that closes a kept-alive connection is no error of the stand-in's."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubStandIn:
    def __init__(self, repo_id: str, files: dict[str, bytes], stall: tuple[str, int] | None = None):
        self.repo_id, self.files, self.stall = repo_id, files, stall
        self.stalled = threading.Event()
        self.requests: list[str] = []  # "GET /api/...": what the client asked, in order
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stall = None
        self.server.shutdown()
        self.server.server_close()

    def tree(self, folder: str = "", recursive: bool = True) -> list[dict]:
        """The repo's entries under folder, as the hub lists them: its files (all below it when
        recursive, else the direct ones) and its sub-folders, which datasets' file globbing walks."""
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for name, data in sorted(self.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            folders.update(
                prefix + "/".join(parts[: i + 1])
                for i in range(len(parts) - 1 if recursive else min(1, len(parts) - 1))
            )
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}})  # fmt: skip
        return [
            {"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
            for f in sorted(folders)
        ] + entries

    def _handler(self):
        hub = self
        api = re.compile(rf"/api/datasets/{re.escape(hub.repo_id)}/(revision|tree)/[^/?]+/?(.*)")
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
                path, _, query = self.path.partition("?")
                hub.requests.append(f"{self.command} {self.path}")
                if found := api.fullmatch(path):
                    info = {"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]}
                    tree = hub.tree(found[2], recursive="recursive=true" in query.lower())
                    return self.send(200, json.dumps(info if found[1] == "revision" else tree).encode())
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
                    if self.command != "HEAD":  # a HEAD answer has the headers only
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
