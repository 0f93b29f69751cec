from tidepool_contracts.service import run_service
from tidepool_proxy.service import main

if __name__ == "__main__":
    run_service("proxy", main)
