"""A fake RunPod API on 127.0.0.1: the GraphQL endpoint the `runpod` package asks for a pod.

It answers `runpod.get_pod(pod_id)` the way api.runpod.io does: `POST /graphql` with a bearer
key, 401 for a key it does not know, `{"data": {"pod": {...}}}` for a pod it holds and
`{"data": {"pod": null}}` for one it does not. The pod's shape is the fields the package's query
reads (`runtime.ports[]` with ip, isIpPublic, privatePort, publicPort, type). Point the package
at it with `env()` (RUNPOD_API_BASE_URL, RUNPOD_API_KEY). Every request is recorded.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

API_KEY = "rp_test_key_0123456789"
_POD_QUERY = re.compile(r'pod\(input:\s*\{\s*podId:\s*"([^"]*)"\s*\}\)')


def pod(pod_id: str, *, runtime: dict[str, Any] | None, status: str = "RUNNING") -> dict[str, Any]:
    return {
        "id": pod_id, "containerDiskInGb": 20, "costPerHr": 0.44, "desiredStatus": status,
        "dockerArgs": "", "dockerId": None, "env": [], "gpuCount": 1, "imageName": "runpod/pytorch",
        "lastStatusChange": "Rented by User", "machineId": "m1", "memoryInGb": 31, "name": pod_id,
        "podType": "RESERVED", "port": None, "ports": "22/tcp", "uptimeSeconds": 12, "vcpuCount": 8,
        "volumeInGb": 0, "volumeMountPath": "/workspace", "runtime": runtime,
        "machine": {"gpuDisplayName": "RTX A5000"},
    }


def running_pod(pod_id: str, ip: str, port: int) -> dict[str, Any]:
    """A pod whose 22/tcp is mapped to ip:port (beside its private address and a web port)."""
    return pod(pod_id, runtime={"ports": [
        {"ip": "100.65.0.2", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
        {"ip": "100.65.0.2", "isIpPublic": False, "privatePort": 8888, "publicPort": 60000, "type": "http"},
        {"ip": ip, "isIpPublic": True, "privatePort": 22, "publicPort": port, "type": "tcp"},
    ]})


def starting_pod(pod_id: str) -> dict[str, Any]:
    """A pod RunPod is still placing: no runtime yet."""
    return pod(pod_id, runtime=None)


class FakeRunPodApi:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.api_key = API_KEY
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = api.answer(self.path, self.headers.get("Authorization", ""), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, path: str, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            query = json.loads(body or b"{}").get("query", "")
            match = _POD_QUERY.search(query)
            self.requests.append({"path": path, "pod": match.group(1) if match else None})
            if path != "/graphql":
                return 404, {"errors": [{"message": "not found"}]}
            if authorization != f"Bearer {self.api_key}":
                return 401, {"errors": [{"message": "Unauthorized"}]}
            if match is None:
                return 200, {"errors": [{"message": "this fake answers pod queries only"}]}
            return 200, {"data": {"pod": self.pods.get(match.group(1))}}

    def pod_lookups(self) -> int:
        with self._lock:
            return sum(1 for request in self.requests if request["pod"])

    def env(self, key: str | None = None) -> dict[str, str]:
        return {
            "RUNPOD_API_BASE_URL": self.url,
            "RUNPOD_API_KEY": self.api_key if key is None else key,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def start(self) -> "FakeRunPodApi":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def fake_runpod_api() -> Iterator[FakeRunPodApi]:
    api = FakeRunPodApi().start()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def runpod_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPodApi]:
    """The fake API, with this process's runpod lookups pointed at it."""
    with fake_runpod_api() as api:
        for name, value in api.env().items():
            monkeypatch.setenv(name, value)
        yield api
