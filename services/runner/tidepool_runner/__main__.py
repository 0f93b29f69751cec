"""Entry point: `python -m tidepool_runner`."""

from tidepool_runner.main import main
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import RunnerSettings

if __name__ == "__main__":
    run_service("runner", main, RunnerSettings)
