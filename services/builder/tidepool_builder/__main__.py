"""Entry point: `python -m tidepool_builder`."""

from tidepool_builder.main import main
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import BuilderSettings

if __name__ == "__main__":
    run_service("builder", main, BuilderSettings)
