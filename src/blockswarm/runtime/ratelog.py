"""Logging that a flood cannot turn into a flood of log lines.

A hostile or broken peer can send thousands of bad messages a second; logging each (with a
traceback for internal errors) would fill disks and cost more than answering them. Each kind of
event (a key) is logged at most once per interval, with how many like it were left out.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, clock=time.monotonic):
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()  # both server threads log

    def _allow(self, key: str) -> int | None:
        """None to stay silent; otherwise how many events of this key were left out before."""
        now = self.clock()
        with self._lock:
            if now - self._last.get(key, -self.interval_s) < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            if len(self._last) > 10_000:  # keys include peer addresses: keep the table bounded
                self._last.clear()
            self._last[key] = now
            return self._suppressed.pop(key, 0)

    def _emit(self, level: int, key: str, message: str, args: tuple, exc_info: bool) -> None:
        left_out = self._allow(key)
        if left_out is None:
            return
        if left_out:
            message += f" ({left_out} more like it in the last {self.interval_s:g} s not logged)"
        self.logger.log(level, message, *args, exc_info=exc_info)

    def info(self, key: str, message: str, *args) -> None:
        self._emit(logging.INFO, key, message, args, False)

    def warning(self, key: str, message: str, *args) -> None:
        self._emit(logging.WARNING, key, message, args, False)

    def exception(self, key: str, message: str, *args) -> None:
        """An error with its traceback, at most once per interval per key."""
        self._emit(logging.ERROR, key, message, args, True)
