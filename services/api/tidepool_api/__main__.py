"""Entry points: `python -m tidepool_api` (the API) and `python -m tidepool_api migrate` (schema migrations
only, then exit: the Kubernetes migrate Job; safe to run beside API replicas, see migrations/env.py)."""

import sys

from tidepool_api.main import main
from tidepool_api.migrate import upgrade_to_head
from tidepool_runtime.observability import configure_logging
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import ApiSettings


def migrate_only() -> None:
    settings = ApiSettings()
    configure_logging("migrate", settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url)


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        migrate_only()
    elif sys.argv[1:]:
        sys.exit(f"usage: python -m tidepool_api [migrate] (not {' '.join(sys.argv[1:])!r})")
    else:
        run_service("api", main, ApiSettings)
