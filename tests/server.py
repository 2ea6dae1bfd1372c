#!/usr/bin/env python3
"""Static HTTP server for the page and the tests: Range requests, HEAD, CORS, and fault injection.

    python3 tests/server.py --mount /=web --mount /models/tiny-sdxl-base=tests/fixtures/tiny-sdxl-base [--port 0]

A folder's URL serves its index.html.

Prints `http://127.0.0.1:PORT` on its first line once it listens. Control endpoints (for tests):
  /_control/reset                            forget the request log and the faults
  /_control/log                              JSON list of the GET requests served: {path, start, end}
  /_control/fail?prefix=P&from=S&after=N&times=K&mode=M
                                             the next K GETs under P for bytes from S on answer
                                             wrongly, by mode: drop (default: N body bytes, then the
                                             connection drops), ignore-range (200 with the whole
                                             file), wrong-range (206 for the range one byte later),
                                             long (a body N bytes longer than the range, as its
                                             Content-Length says), chunked (a correct
                                             chunked body), endless (a chunked body that never
                                             ends), stall (the headers, then N seconds of silence)
  /_control/etag?prefix=P&value=V            files under P state V as their sha256 (default: their
                                             true sha256, in X-Linked-Etag as the hub states it;
                                             an empty V: none)
  /_redirect/PATH                            302 to /PATH, stating the file's true sha256 (as the hub
                                             redirects to its CDN)
"""
import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

STATE = {"log": [], "faults": [], "etags": {}}
SHA256 = {}


def sha256(file):
    key = (file, os.path.getmtime(file))
    if key not in SHA256:
        with open(file, "rb") as f:
            SHA256[key] = hashlib.sha256(f.read()).hexdigest()
    return SHA256[key]
# Module scripts and streaming wasm compilation need exact types; weights are plain bytes.
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".html": "text/html; charset=utf-8", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml",
         ".webmanifest": "application/manifest+json"}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    mounts = {}

    def log_message(self, *args):
        pass

    def cors(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Expose-Headers", "Content-Length, Content-Range, X-Linked-Etag")

    def do_OPTIONS(self):
        self.send_response(204)
        self.cors()
        self.end_headers()

    def reply(self, status, body):
        self.send_response(status)
        self.cors()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def control(self, url, head):
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with LOCK:
            if url.path != "/_control/log" and head:
                pass  # side effects on GET only
            elif url.path == "/_control/reset":
                STATE["log"].clear()
                STATE["faults"].clear()
                STATE["etags"].clear()
            elif url.path == "/_control/etag":
                STATE["etags"][query["prefix"]] = query.get("value", "")
            elif url.path == "/_control/fail":
                STATE["faults"].append({
                    "prefix": query["prefix"], "from": int(query.get("from", 0)),
                    "after": int(query.get("after", 0)), "times": int(query.get("times", 1)),
                    "mode": query.get("mode", "drop"),
                })
            elif url.path != "/_control/log":
                return self.reply(404, b"{}")
            body = json.dumps(STATE["log"]).encode() if url.path == "/_control/log" else b"ok"
        self.reply(200, body)

    def etag(self, path, file):
        with LOCK:
            for prefix, value in STATE["etags"].items():
                if path.startswith(prefix):
                    return value
        return sha256(file)

    def resolve(self, path):
        for prefix, root in self.mounts.items():
            if path.startswith(prefix + "/"):
                rel = path[len(prefix) + 1:]
                full = os.path.realpath(os.path.join(root, rel))
                if os.path.isdir(full):
                    full = os.path.join(full, "index.html")
                inside = full.startswith(os.path.realpath(root) + os.sep)
                if inside and os.path.isfile(full):
                    return full
        return None

    def serve(self, head):
        url = urlparse(self.path)
        path = unquote(url.path)
        if path.startswith("/_control/"):
            return self.control(url, head)
        if path.startswith("/_redirect/"):
            target = self.resolve(path[len("/_redirect"):])
            self.send_response(302)
            self.cors()
            if target:
                self.send_header("X-Linked-Etag", f'"{sha256(target)}"')
            self.send_header("Location", self.path[len("/_redirect"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = self.resolve(path)
        if file is None:
            return self.reply(404, b'{"error": "not found"}')
        size = os.path.getsize(file)
        start, end = 0, size
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            a, _, b = header[len("bytes="):].partition("-")
            start, end = int(a), min(size, int(b) + 1) if b else size
            if start >= end:
                self.send_response(416)
                self.cors()
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
        fault = None
        if not head:
            with LOCK:
                STATE["log"].append({"path": path, "start": start, "end": end})
                for f in STATE["faults"]:
                    if f["times"] > 0 and path.startswith(f["prefix"]) and start >= f["from"]:
                        f["times"] -= 1
                        fault = f
                        break
        mode = fault["mode"] if fault else None
        if mode == "ignore-range":
            header, start, end = None, 0, size
        elif mode == "wrong-range":
            start, end = start + 1, min(size, end + 1)
        elif mode in ("chunked", "endless"):
            return self.chunked(file, start, end, endless=mode == "endless")
        self.send_response(206 if header else 200)
        self.cors()
        self.send_header("Content-Type", TYPES.get(os.path.splitext(file)[1], "application/octet-stream"))
        extra = fault["after"] if mode == "long" else 0
        self.send_header("Content-Length", str(end - start + extra))
        tag = self.etag(path, file)
        if tag:
            self.send_header("X-Linked-Etag", f'"{tag}"')
        if header:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        if mode == "stall":
            self.wfile.flush()
            time.sleep(fault["after"])
            self.close_connection = True
            return
        limit = min(end - start, fault["after"]) if mode == "drop" else end - start
        with open(file, "rb") as f:
            f.seek(start)
            body = f.read(limit) + bytes(extra)
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client read what it asked for and left
        if limit < end - start:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def chunked(self, file, start, end, endless):
        """A 206 with a chunked body (HTTP/1.1): the range, or, when `endless`, zeros forever after it."""
        self.protocol_version = "HTTP/1.1"
        self.send_response(206)
        self.cors()
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{os.path.getsize(file)}")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with open(file, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        try:
            for i in range(0, len(body), 4096):
                piece = body[i:i + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            while endless:
                self.wfile.write(b"%x\r\n%s\r\n" % (65536, bytes(65536)))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self.serve(head=False)

    def do_HEAD(self):
        self.serve(head=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mount", action="append", default=[], help="/prefix=DIR")
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin closes (the test process ended)")
    args = parser.parse_args()
    if args.exit_with_stdin:
        threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    Handler.mounts = {m.split("=", 1)[0].rstrip("/"): m.split("=", 1)[1] for m in args.mount}
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
