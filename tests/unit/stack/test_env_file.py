"""`.tidepool/env` is what the README says: lines a shell can `source` to point the SDK at the stack."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tidepool_stack.supervisor import Stack, StackConfig


def test_env_file_exports_the_sdk_settings_to_a_sourcing_shell(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path, api_port=3123))
    stack.admin_key = "tp_example"
    path = stack.write_env_file()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the file holds the admin key"
    shown = subprocess.run(
        ["bash", "-c", f'. "{path}"; bash -c \'echo "$DAYTONA_API_URL $DAYTONA_API_KEY"\''],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout
    assert shown == "http://localhost:3123/api tp_example\n"


def test_env_file_is_replaced_whole(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path))
    stack.admin_key = "tp_first"
    stack.write_env_file()
    stack.admin_key = "tp_second"
    path = stack.write_env_file()
    assert "tp_first" not in path.read_text()
    assert not (tmp_path / "env.new").exists()
