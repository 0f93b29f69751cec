"""`GET /object-storage/push-access`: where and with what the SDK uploads declarative-build context.

The SDK (`SnapshotService.process_image_context`) asks for these credentials before uploading each local
context as `{organizationId}/{hash}/context.tar` to `storageUrl` (path-style, SigV4, https only).

Daytona answers with STS credentials scoped to `{bucket}/{organizationId}/*` for one hour. With the embedded
object storage (`s3_scoped_keys`), the key is minted here: it names the organization and expires in an hour,
and the storage's auth proxy maps it to that organization's own directory (tidepool_runtime.object_keys),
so a tenant can neither read nor overwrite another's context. With an external S3 given as a static key
pair, that pair is returned (scoping then needs STS on that server). `sessionToken` is empty: no
temporary-credential service issues one here (the scoped key already names the organization and expires,
and nothing would check a token: the embedded storage's auth proxy sees only the access key), and the SDK
requires the field.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter

from tidepool_api.errors import ApiError
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.schemas import StorageAccessDto, error_responses
from tidepool_runtime.object_keys import user_key
from tidepool_runtime.settings import ApiSettings

log = structlog.get_logger("tidepool.api.object_storage")
router = APIRouter(responses=error_responses(401))

SESSION_SECONDS = 3600  # as Daytona's STS sessions


def object_storage_configured(settings: ApiSettings) -> bool:
    has_keys = settings.s3_scoped_keys or bool(settings.s3_access_key)
    return bool(settings.s3_endpoint and settings.s3_secret_key and has_keys)


@router.get("/object-storage/push-access", response_model=StorageAccessDto, responses=error_responses(503))
async def push_access(context: Context, caller: Caller) -> JsonResponse:
    settings = context.settings
    if not object_storage_configured(settings):
        raise ApiError(
            503,
            "object storage is not configured: set TIDEPOOL_S3_ENDPOINT, TIDEPOOL_S3_ACCESS_KEY and "
            "TIDEPOOL_S3_SECRET_KEY (`tidepool up` starts an embedded one); images with local files "
            "(add_local_file, add_local_dir, ...) cannot be built without it",
        )
    if not settings.s3_endpoint.startswith("https://"):
        log.warning("object_storage.plain_http", endpoint=settings.s3_endpoint, hint="the SDK requires https")
    if settings.s3_scoped_keys:
        access_key, secret, _ = user_key(settings.s3_secret_key, caller.organization_id, SESSION_SECONDS)
    else:
        access_key, secret = settings.s3_access_key, settings.s3_secret_key
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
