"""`llmrec serve` as a child process on loopback, for scripts and tests that talk to a real server: start it on a
free port, wait until `/health` answers, stop it at the end; a JSON POST, and one whose client leaves before the
answer (a fault the server must survive)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from llmrec.errors import LLMRecError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def abandoned_post(url: str, path: str, body: dict) -> None:
    """POST `body` to `url` + `path` and close the connection without reading the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


@contextlib.contextmanager
def local_server(run_dirs: list[str | Path], log: Path, vllm_args: list[str] = (),
                 start_timeout: float = 400) -> Iterator[tuple[str, subprocess.Popen]]:
    """`llmrec serve RUN_DIR... -- VLLM_ARGS` on a free loopback port, its output in `log`; yields (base URL, the
    process) once /health answers, and stops the server on exit. A server that stops or does not start in time
    raises, with the end of its log."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "llmrec", "serve", *map(str, run_dirs), "--port", str(port)]
    with open(log, "w") as handle:
        server = subprocess.Popen([*command, *(["--", *vllm_args] if vllm_args else [])], stdout=handle,
                                  stderr=subprocess.STDOUT,
                                  env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ})  # 1 GiB unless set
    try:
        deadline = time.time() + start_timeout
        while True:
            if server.poll() is not None:
                raise LLMRecError(f"the server stopped: {log.read_text()[-3000:]}", str(log))
            if time.time() > deadline:
                raise LLMRecError(f"the server did not start in {start_timeout:.0f} s: {log.read_text()[-3000:]}",
                                  str(log))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
