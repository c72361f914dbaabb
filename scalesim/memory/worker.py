"""The transfer threads: on-demand loads first, then staged disk writes, prefetches, write-back.

They are the CPU's copy engine: every copy, file read and file write runs here with the manager
lock released (file I/O and large copies release the GIL too), so moves overlap the model's
compute and each other. Woken by requests, hints and finished requests, and every `interval_s`.
"""

import logging
import threading

from scalesim.memory.manager import MemoryManager

logger = logging.getLogger(__name__)
DEFAULT_TRANSFER_THREADS = 2
DEFAULT_INTERVAL_S = 0.05


class TransferWorker:
    def __init__(self, manager: MemoryManager, threads: int = DEFAULT_TRANSFER_THREADS,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self.wake = manager.wake
        self.stopping = False
        self.threads = [threading.Thread(target=self._run, name=f"scalesim-transfer-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        manager = self.manager
        while not self.stopping:
            self.wake.wait(self.interval_s)
            self.wake.clear()
            if self.stopping:
                return
            try:
                with manager.lock:
                    manager.advance_clock()
                busy = manager.serve_on_demand(unlock=True)
                busy += manager.flush_writes_once(unlock=True)
                busy += manager.prefetch_once(unlock=True)
                if not busy:
                    manager.write_back_once(unlock=True)
            except Exception:  # never let a move failure take the engine down
                logger.exception("memory transfer thread failed a step")

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        for thread in self.threads:
            if thread is not threading.current_thread():  # a finaliser may run on one of them
                thread.join(timeout=5)
