"""Write deploy/k8s/base/nats/nats.conf from the access table (tidepool_stack.k8s_nats); `--check` only
compares (exit 1 when the checked-in file is stale)."""

from __future__ import annotations

import sys
from pathlib import Path

from tidepool_stack.k8s_nats import render

TARGET = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "base" / "nats" / "nats.conf"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/render_k8s_nats.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
