"""`GET /object-storage/push-access`: where and with what the SDK uploads declarative-build context.

The SDK (`SnapshotService.process_image_context`) asks for these credentials before uploading each local
context as `{organizationId}/{hash}/context.tar` to `storageUrl` (path-style, SigV4, https only).

Daytona answers with STS credentials scoped to `{bucket}/{organizationId}/*` for one hour. Here the key is
minted by the API: it names the organization and expires in an hour, and Tidepool's object-storage gateway
(tidepool_stack.s3_gateway, in front of a local directory or an external S3) maps it to that organization's
own root (tidepool_runtime.object_keys), so a tenant can neither read nor overwrite another's context. The
storage's own key pair (an external S3's master key) is held by the gateway alone and never returned.
`sessionToken` is empty: the scoped key already names the organization and expires, nothing would check a
token (the gateway sees only the access key), and the SDK requires the field.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter

from tidepool_api.errors import ApiError
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import BuildContextWriter, Context
from tidepool_api.schemas import StorageAccessDto, error_responses
from tidepool_runtime.object_keys import user_key
from tidepool_runtime.settings import ApiSettings

log = structlog.get_logger("tidepool.api.object_storage")
router = APIRouter(responses=error_responses(401))

SESSION_SECONDS = 3600  # as Daytona's STS sessions


def object_storage_configured(settings: ApiSettings) -> bool:
    return bool(settings.s3_endpoint and settings.s3_secret_key)


@router.get("/object-storage/push-access", response_model=StorageAccessDto, responses=error_responses(503))
async def push_access(context: Context, caller: BuildContextWriter) -> JsonResponse:
    settings = context.settings
    if not object_storage_configured(settings):
        raise ApiError(
            503,
            "object storage is not configured: set TIDEPOOL_S3_ENDPOINT (Tidepool's object-storage gateway) "
            "and TIDEPOOL_S3_SECRET_KEY (its master secret); `make up` starts one; images with local files "
            "(add_local_file, add_local_dir, ...) cannot be built without it",
        )
    if not settings.s3_endpoint.startswith("https://"):
        log.warning("object_storage.plain_http", endpoint=settings.s3_endpoint, hint="the SDK requires https")
    access_key, secret, _ = user_key(settings.s3_secret_key, caller.organization_id, SESSION_SECONDS)
    return JsonResponse(
        {
            "accessKey": access_key,
            "secret": secret,
            "sessionToken": "",
            "storageUrl": settings.s3_endpoint.rstrip("/"),
            "organizationId": caller.organization_id,
            "bucket": settings.s3_bucket,
            "region": settings.s3_region,
        }
    )
