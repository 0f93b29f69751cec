"""JSON responses rendered by orjson (ints stay ints, datetimes never reach here unformatted)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class JsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
