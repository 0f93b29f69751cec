"""Entry point: `python -m tidepool_scheduler`."""

from tidepool_runtime.process import run_service
from tidepool_runtime.settings import SchedulerSettings
from tidepool_scheduler.main import main

if __name__ == "__main__":
    run_service("scheduler", main, SchedulerSettings)
