"""Entry point: `python -m tidepool_api`."""

from tidepool_api.main import main
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import ApiSettings

if __name__ == "__main__":
    run_service("api", main, ApiSettings)
