from tidepool_runtime.process import run_service
from tidepool_runtime.settings import SshGatewaySettings
from tidepool_ssh_gateway.main import main

if __name__ == "__main__":
    run_service("ssh_gateway", main, SshGatewaySettings)
