"""Issue #9 item 4: `/api/openapi.json` tells the truth, checked by schemathesis against the LIVE API.

A real stack (`stack` fixture: NATS, Podman, every service); requests go over HTTP with a tenant's API key,
as an SDK user's would. Every documented operation gets a bounded number of generated requests, valid
and invalid (schemathesis' positive and negative modes), and each answer must be: not a 5xx, a documented
status code, of the documented content type, and conform to the documented schema.

What would be heavy is bounded, never faked: `POST /sandbox` and `POST /snapshots` get few examples and no
`buildInfo` (each valid one would build an image), and every sandbox the run created is deleted after it.
`DELETE /api-keys/{name}` never gets the name of the key in use (the run would lose its own access).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 12  # per operation and mode: ~1,000 requests in all
# Operations that create heavy things (containers, image builds): a few examples only.
FEW = {("POST", "/api/sandbox"): 4, ("POST", "/api/snapshots"): 4}
TENANT_KEY_NAME = "default"


def adjust(method: str, path: str, case: Any) -> None:
    """Keep a generated request from building images or revoking the key the run uses."""
    if (method, path) in FEW and isinstance(case.body, dict):
        case.body.pop("buildInfo", None)
    if (method, path) == ("DELETE", "/api/api-keys/{name}") and case.path_parameters.get(
        "name"
    ) == TENANT_KEY_NAME:
        case.path_parameters["name"] = f"{TENANT_KEY_NAME}-not"


def check_operations(base_url: str, key: str, examples: int = EXAMPLES) -> list[str]:
    """Run schemathesis over every operation of `{base_url}/api/openapi.json`; returns the failures, one line
    each (empty when the API conforms)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json")
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        method, path = operation.method.upper(), operation.path
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            test = make_test(
                operation, mode, method, path, base_url, headers, FEW.get((method, path), examples)
            )
            try:
                test()
            except Unsatisfiable:
                pass  # no invalid request exists (e.g. only free-form string parameters): nothing to send
            except (Exception, BaseExceptionGroup) as error:  # collected: the run reports every failure
                failures.append(f"{method} {path} [{mode.value}]: {str(error)[:2000]}")
    return failures


def make_test(
    operation: Any,
    mode: GenerationMode,
    method: str,
    path: str,
    base_url: str,
    headers: dict[str, str],
    examples: int,
) -> Callable[[], None]:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def test(case: Any) -> None:
        adjust(method, path, case)
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=120)

    return test


def create_tenant(api_url: str, admin_key: str) -> tuple[str, str]:
    created = httpx.post(
        f"{api_url}/organizations",
        json={"name": f"fuzz-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["apiKey"]["value"]


def delete_every_sandbox(api_url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{api_url}/sandbox", headers=headers, params={"limit": 200})
    assert listed.status_code == 200, listed.text
    for item in listed.json()["items"]:
        httpx.delete(f"{api_url}/sandbox/{item['id']}", headers=headers, timeout=120)

    def none_left() -> bool:
        answer = httpx.get(f"{api_url}/sandbox", headers=headers, params={"limit": 200})
        return answer.status_code == 200 and all(
            item["state"] == "destroyed" for item in answer.json()["items"]
        )

    wait_until(none_left, "sandboxes created by the schemathesis run remain", timeout=120)


def test_the_live_api_conforms_to_its_openapi(stack: StackThread) -> None:
    _, key = create_tenant(stack.api_url, stack.api_key)
    base_url = stack.api_url.removesuffix("/api")
    try:
        failures = check_operations(base_url, key)
    finally:
        delete_every_sandbox(stack.api_url, key)
    assert not failures, "\n\n".join(failures)
