"""Entry point run inside the sandbox: `python3 -I /opt/tidepool/daemon/main.py --socket PATH`.

It starts the supervisor, which forks the serving worker, `tidepool-worker` (see
`tidepool_daemon/supervisor.py`). `-I` (isolated mode) keeps the user's PYTHONPATH and site-packages away
from the daemon, but also drops the script's directory from sys.path, so it is added back explicitly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tidepool_daemon.supervisor import main

if __name__ == "__main__":
    raise SystemExit(main())
