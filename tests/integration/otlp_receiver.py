"""A real OTLP metrics receiver on loopback, from the OTLP protobuf definitions (opentelemetry-proto):
OTLP/HTTP `POST /v1/metrics` (`http_url`) and OTLP/gRPC `MetricsService/Export` (`grpc_url`).

No OpenTelemetry Collector is installable from the package registries, so this one keeps what it is sent
in memory: every data point with its resource attributes, its attributes and the request's headers.
"""

from __future__ import annotations

import gzip
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# gRPC's fork handlers abort children forked while its threads run (the stack's services are forked from
# this process, with a `preexec_fn`): off, before grpc is first imported.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class Point:
    """One gauge or sum data point as received; `transport` is `http` or `grpc`."""

    transport: str
    resource: dict[str, Any]
    name: str
    unit: str
    attributes: dict[str, Any]
    value: float
    headers: dict[str, str]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def points_of(request: ExportMetricsServiceRequest, transport: str, headers: dict[str, str]) -> list[Point]:
    found = []
    for resource_metrics in request.resource_metrics:
        resource = {item.key: _value(item.value) for item in resource_metrics.resource.attributes}
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind not in ("gauge", "sum"):
                    continue
                for point in getattr(metric, kind).data_points:
                    number = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
                    attributes = {item.key: _value(item.value) for item in point.attributes}
                    found.append(
                        Point(transport, resource, metric.name, metric.unit, attributes, number, headers)
                    )
    return found


class MetricsReceiver:
    """Serves OTLP/HTTP and OTLP/gRPC on loopback ports; `points()` is everything received so far."""

    def __init__(self) -> None:
        self._points: list[Point] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/metrics":
                    self.send_response(404)
                    self.end_headers()
                    return
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver._add(points_of(ExportMetricsServiceRequest.FromString(body), "http", headers))
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(
                self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
            ) -> ExportMetricsServiceResponse:
                headers = {key: value for key, value in context.invocation_metadata()}
                receiver._add(points_of(request, "grpc", headers))
                return ExportMetricsServiceResponse()

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), self._grpc)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        self.grpc_url = f"grpc://127.0.0.1:{port}"

    def _add(self, points: list[Point]) -> None:
        with self._lock:
            self._points.extend(points)

    def points(self) -> list[Point]:
        with self._lock:
            return list(self._points)

    def start(self) -> None:
        self._thread.start()
        self._grpc.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None)
