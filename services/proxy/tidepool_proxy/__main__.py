from tidepool_proxy.main import main
from tidepool_runtime.process import run_service

if __name__ == "__main__":
    run_service("proxy", main)
