"""`BENCH_ONLY=apioverhead`: what auth + rate limit + audit + quota admission cost per API request.

Each figure is the median and p95 of BENCH_OVERHEAD_REQUESTS requests (default 300) on one keep-alive
connection, in alternating rounds, against the running stack, with a tenant organization whose quota is
0 vCPU (so the create is refused by the quota after the full admission path, and nothing is made):

- `no auth (404 route)`: a path no route answers: the HTTP server, middlewares and router only;
- `auth read (404 sandbox)`: `GET /sandbox/{unknown}`: the key check, the rate-limit count, one query;
- `auth + audit write (404)`: `PUT /sandbox/{unknown}/labels`: the above plus the audit record written
  before and completed after;
- `auth + audit + quota (403)`: `POST /sandbox {}`: the above plus the snapshot lookup, the organization
  lock and the usage sum, refused with Daytona's "Total CPU limit exceeded".

The ratio is each median to the no-auth request's.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

import httpx

from tests.integration.stackthread import StackThread

REQUESTS = int(os.environ.get("BENCH_OVERHEAD_REQUESTS", "300"))
ROUNDS = 5


def bench_apioverhead(stack: StackThread) -> list[str]:
    admin = {"Authorization": f"Bearer {stack.api_key}"}
    created = httpx.post(
        f"{stack.api_url}/organizations", json={"name": f"bench-{uuid.uuid4().hex[:6]}"}, headers=admin
    ).json()
    organization_id, key = created["id"], created["apiKey"]["value"]
    # No sandbox fits, and no throttler refuses during the run.
    quota = {"totalCpuQuota": 0, "authenticatedRateLimit": 1_000_000, "sandboxCreateRateLimit": 1_000_000}
    httpx.patch(f"{stack.api_url}/organizations/{organization_id}/quota", json=quota, headers=admin)
    missing = str(uuid.uuid4())
    kinds: dict[str, tuple[str, str, dict[str, object] | None, int]] = {
        "no auth (404 route)": ("GET", "/no-such-route", None, 404),
        "auth read (404 sandbox)": ("GET", f"/sandbox/{missing}", None, 404),
        "auth + audit write (404)": ("PUT", f"/sandbox/{missing}/labels", {"labels": {"a": "b"}}, 404),
        "auth + audit + quota (403)": ("POST", "/sandbox", {}, 403),
    }
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    per_round = max(1, REQUESTS // ROUNDS)
    tenant = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.api_url, headers=tenant, timeout=60) as client:
        for method, path, body, status in kinds.values():  # warm: connection, first queries
            assert client.request(method, path, json=body).status_code == status
        for _ in range(ROUNDS):
            for name, (method, path, body, status) in kinds.items():
                for _ in range(per_round):
                    started = time.perf_counter()
                    answer = client.request(method, path, json=body)
                    samples[name].append((time.perf_counter() - started) * 1000)
                    assert answer.status_code == status, answer.text
    base = statistics.median(samples["no auth (404 route)"])
    lines = []
    for name, values in samples.items():
        ordered = sorted(values)
        median = statistics.median(ordered)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        lines.append(
            f"{'API ' + name:<36} n={len(ordered):<4} median={median:8.2f} ms  p95={p95:8.2f} ms  "
            f"ratio to no-auth={median / base:5.2f}x"
        )
    return lines
