from tidepool_contracts.service import run_service
from tidepool_runner.service import main

if __name__ == "__main__":
    run_service("runner", main)
