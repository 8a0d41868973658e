"""One host thread per rank: how independent per-device programs are driven from one process."""

from __future__ import annotations

import threading
from typing import Callable, Sequence


def run_in_threads(fns: Sequence[Callable[[], object]], name: str = "rank") -> list:
    """Runs each fn in its own host thread; returns the results in order; re-raises the first error in the
    caller's thread. JAX releases the GIL while it waits on a device, so ranks progress at their own pace."""
    if len(fns) == 1:
        return [fns[0]()]
    results, errors = [None] * len(fns), []

    def work(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # surfaced below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), name=f"{name}-{i}") for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
