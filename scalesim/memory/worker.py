"""The memory layer's transfer thread."""

import logging
import threading

from scalesim.memory.manager import MemoryManager

logger = logging.getLogger(__name__)


class PrefetchWorker:
    """The transfer thread (on CPU; a CUDA stream's job on GPU): serves on-demand loads first,
    then prefetches; woken by requests, hints and finished requests, and every `interval_s`."""

    def __init__(self, manager: MemoryManager, interval_s: float = 0.05) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self.wake = manager.wake
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="scalesim-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.interval_s)
            self.wake.clear()
            if self.stopping:
                return
            try:
                self.manager.serve_on_demand()
                self.manager.prefetch_once()
            except Exception:  # never let a load failure take the engine down
                logger.exception("memory worker step failed")

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)
