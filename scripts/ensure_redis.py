"""Fail early and clearly when the suite cannot have a Redis (the tests start their own `redis-server`)."""

from __future__ import annotations

import shutil
import sys

if __name__ == "__main__":
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed; `.ci/run` installs it with apt (apt-get install redis-server)")
    print("redis-server:", shutil.which("redis-server"))
