from tidepool_proxy.main import main
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import ProxySettings

if __name__ == "__main__":
    run_service("proxy", main, ProxySettings)
