"""A child process that outlives its parent would run (and hold memory or GPUs) forever: a
local function instance and a learner's follower ranks watch their parent and exit with it."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int | None = None, code: int = 0) -> None:
    """Exit with `code` as soon as `parent` (default: the current parent) is gone."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(code)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
