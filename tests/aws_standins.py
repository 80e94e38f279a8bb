"""Stand-ins for the two AWS services a machine talks to, on 127.0.0.1 only: S3 (moto's server
mode, a real S3 API from PyPI) and the instance metadata service (IMDSv2: a session token, the
instance role's credentials, the region, and a spot notice or rebalance recommendation a test
can announce)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

REGION = "eu-west-1"
ROLE = "trainstack-exp1-machine-role"
#: The keys the fake instance role hands out (moto accepts any).
ROLE_KEYS = {"AccessKeyId": "ASIAFAKEROLEKEY", "SecretAccessKey": "fake-role-secret", "Token": "fake-session-token"}


class S3Server:
    """moto's S3 in server mode on 127.0.0.1, with a bucket made for the test."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="test",
                            aws_secret_access_key="test")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found

    def stop(self) -> None:
        self._server.stop()


@dataclass
class ImdsState:
    instance_action: dict[str, str] | None = None
    rebalance: dict[str, str] | None = None
    tokens: set[str] = field(default_factory=set)
    #: (method, path, had a valid token) of every request, in order.
    requests: list[tuple[str, str, bool]] = field(default_factory=list)


class FakeImds:
    """IMDSv2 as an instance sees it at 169.254.169.254, here on 127.0.0.1:<port>: a GET
    without a token from PUT /latest/api/token is refused (401), as with http_tokens=required."""

    def __init__(self) -> None:
        self.state = ImdsState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:  # noqa: N802
                state.requests.append(("PUT", self.path, True))
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                token = f"token-{len(state.tokens)}"
                state.tokens.add(token)
                self._send(200, token)

            def do_GET(self) -> None:  # noqa: N802
                valid = self.headers.get("X-aws-ec2-metadata-token") in state.tokens
                state.requests.append(("GET", self.path, valid))
                if not valid:
                    return self._send(401)
                answers = {
                    "/latest/meta-data/placement/region": REGION,
                    "/latest/meta-data/iam/security-credentials/": ROLE,
                    f"/latest/meta-data/iam/security-credentials/{ROLE}": json.dumps(
                        {"Code": "Success", "Type": "AWS-HMAC", "Expiration": "2099-01-01T00:00:00Z", **ROLE_KEYS}
                    ),
                }
                if state.instance_action is not None:
                    answers["/latest/meta-data/spot/instance-action"] = json.dumps(state.instance_action)
                if state.rebalance is not None:
                    answers["/latest/meta-data/events/recommendations/rebalance"] = json.dumps(state.rebalance)
                if self.path in answers:
                    return self._send(200, answers[self.path])
                self._send(404, "Not Found")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def announce_interruption(self, action: str = "terminate") -> None:
        """AWS's two-minute notice: the machine will be stopped or terminated."""
        self.state.instance_action = {"action": action, "time": "2026-01-01T00:02:00Z"}

    def recommend_rebalance(self) -> None:
        self.state.rebalance = {"noticeTime": "2026-01-01T00:00:00Z"}

    def clear(self) -> None:
        self.state.instance_action = None
        self.state.rebalance = None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    server = FakeImds()
    yield server
    server.stop()
