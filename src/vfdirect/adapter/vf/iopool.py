"""The IO threads of one VF (``vfdirect adapter run --io-threads N``, claim X2).

Rules of this module:

* a pool is a fixed number of daemon threads taking tasks from one queue, started with
  the first task; a task is a callable that handles its own errors (the VF's task
  records the outcome and posts it back to the VF thread), so nothing here decides what
  a failure means;
* the pool never touches ring state: it only runs what it is given. Whether a finished
  task's result is still wanted is the VF thread's business (see
  :mod:`vfdirect.adapter.vf.worker`, "stale executions");
* :meth:`IoPool.stop` lets queued and running tasks finish and joins the threads within
  a bound; it reports whether they all stopped (a task blocked in a dead disk keeps its
  thread, which is a daemon thread and dies with the process).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

Task = Callable[[], None]


class IoPool:
    """``size`` threads running tasks in submission order (completion in any order)."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"an IO pool needs at least one thread, not {size}")
        self.size = size
        self._name = name
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def submit(self, task: Task) -> None:
        if self._stopped:
            raise RuntimeError(f"{self._name}: the IO pool is stopped")
        if not self._threads:
            for i in range(self.size):
                thread = threading.Thread(target=self._run, name=f"{self._name}-io{i}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        self._tasks.put(task)

    def stop(self, timeout: float) -> bool:
        """Finish the tasks, stop the threads; True if all stopped within ``timeout``."""
        self._stopped = True
        for _ in self._threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            task()
            del task  # hold nothing of a finished task (views of guest memory)
