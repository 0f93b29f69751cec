"""API-key scopes: Daytona's `OrganizationResourcePermission` values, as the SDK's api client sends them.

There is no `read:sandboxes`, `read:snapshots` or `read:registries` (as in Daytona): any valid key of an
organization reads those. What each route of the API needs is declared on the route itself
(`tidepool_api.routes.deps.Requires`); the toolbox proxy needs `TOOLBOX_PERMISSION` for every toolbox call.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Permission(StrEnum):
    WRITE_REGISTRIES = "write:registries"
    DELETE_REGISTRIES = "delete:registries"
    WRITE_SNAPSHOTS = "write:snapshots"
    DELETE_SNAPSHOTS = "delete:snapshots"
    WRITE_SANDBOXES = "write:sandboxes"
    DELETE_SANDBOXES = "delete:sandboxes"
    READ_VOLUMES = "read:volumes"
    WRITE_VOLUMES = "write:volumes"
    DELETE_VOLUMES = "delete:volumes"
    WRITE_REGIONS = "write:regions"
    DELETE_REGIONS = "delete:regions"
    READ_RUNNERS = "read:runners"
    WRITE_RUNNERS = "write:runners"
    DELETE_RUNNERS = "delete:runners"
    READ_AUDIT_LOGS = "read:audit_logs"


# Every scope: what an organization's first key (and the operator's bootstrap key) gets.
ALL_PERMISSIONS: tuple[str, ...] = tuple(permission.value for permission in Permission)

# Daytona's ToolboxController requires write:sandboxes on the whole class: running code, writing files, git,
# sessions, PTYs and LSP all change the sandbox, and even "reads" (file downloads, process logs) expose its
# content, which a read-only key of the organization must not get. The proxy applies the same rule.
TOOLBOX_PERMISSION = Permission.WRITE_SANDBOXES


def missing(granted: Iterable[str], required: Iterable[str]) -> list[str]:
    """The required permissions a key lacks, in the order asked (empty: allowed)."""
    have = set(granted)
    return [permission for permission in required if permission not in have]


def normalized(permissions: Iterable[str]) -> list[str]:
    """Deduplicated, in the enum's order; ValueError names an unknown permission."""
    wanted = set()
    for permission in permissions:
        wanted.add(Permission(permission).value)
    return [permission for permission in ALL_PERMISSIONS if permission in wanted]
