"""Entry point: `python -m tidepool_telemetry`."""

from tidepool_runtime.process import run_service
from tidepool_runtime.settings import TelemetrySettings
from tidepool_telemetry.main import main

if __name__ == "__main__":
    run_service("telemetry", main, TelemetrySettings)
