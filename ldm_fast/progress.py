"""Progress for long loops (sampling steps, training steps) that reads well in both places a
run is watched: a live tqdm bar on a terminal, and in a log file (stderr not a TTY) a plain
line now and then instead of the carriage returns a bar writes for every update."""

from __future__ import annotations

import sys
import time

# A log line at most this often (seconds), and always at the end.
LOG_INTERVAL_S = 30.0


class _LogLines:
    """tqdm's update / set_postfix / close, printed as occasional plain lines."""

    def __init__(self, total: int, initial: int, desc: str, stream, interval: float):
        self.total, self.n, self.desc, self.stream, self.interval = total, initial, desc, stream, interval
        self.postfix = ""
        self.t_start = self.t_last = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.t_last >= self.interval:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, now: float) -> None:
        self.t_last = now
        elapsed = now - self.t_start
        rate = f", {self.n / elapsed:.2f} it/s" if elapsed > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of}{rate}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.perf_counter())


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool = True, initial: int = 0, stream=None,
                 interval: float = LOG_INTERVAL_S):
    """A tqdm bar when `stream` (default stderr) is a terminal, occasional plain lines when it
    is not, nothing when disabled. total None: unknown. The object has update(n),
    set_postfix(**kw) and close()."""
    if not enabled:
        return _Off()
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)
    return _LogLines(total, initial, desc, stream, interval)
