"""Tenants' OTLP/HTTP endpoints (tidepool_telemetry.guarded_http): each connection's address is checked
before anything is sent, against a real HTTP server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from tidepool_runtime.netguard import parse_networks
from tidepool_telemetry.guarded_http import guarded_session
from tidepool_telemetry.organization_metrics import Destination, otlp_exporter


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_connection_to_a_non_public_address_is_refused_before_sending(receiver: Receiver) -> None:
    port = receiver.server_address[1]
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(requests.ConnectionError, match=r"refused to connect: .*loopback"):
            guarded_session().post(f"http://{host}:{port}/v1/metrics", data=b"x", timeout=5)
    assert receiver.paths == []
    allowed = guarded_session(parse_networks(["127.0.0.0/8", "::1"]))
    assert allowed.post(f"http://localhost:{port}/v1/metrics", data=b"x", timeout=5).status_code == 200
    assert receiver.paths == ["/v1/metrics"]


def test_a_tenants_exporter_is_guarded_and_the_operators_is_not(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1")  # no retries for long on a refusal
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    empty = MetricsData(resource_metrics=[])
    tenant = otlp_exporter(Destination(endpoint), allowed=())
    assert tenant.export(empty) is MetricExportResult.FAILURE
    assert receiver.paths == []
    operator = otlp_exporter(Destination(endpoint))
    assert operator.export(empty) is MetricExportResult.SUCCESS
    allowed_tenant = otlp_exporter(Destination(endpoint), allowed=parse_networks(["127.0.0.1"]))
    assert allowed_tenant.export(empty) is MetricExportResult.SUCCESS
    assert receiver.paths == ["/v1/metrics", "/v1/metrics"]
