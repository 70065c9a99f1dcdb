"""Where a run's time and memory go: wall time and resident memory per pipeline stage.

:class:`StageProfile` wraps the pipeline's progress callback: every change of stage name
closes the previous stage. A background thread samples the process's resident set size
(``/proc/self/statm``, every 20 ms), so each stage reports the peak it reached, not only
the process-wide maximum. The figures go to ``report.json`` (``stages``) and to the
progress display.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    rss_end: int = 0
    rss_peak: int = 0

    def to_json(self) -> dict:
        mib = 1 << 20
        return {"stage": self.name, "seconds": round(self.seconds, 3), "rss_mb_end": round(self.rss_end / mib, 1),
                "rss_mb_peak": round(self.rss_peak / mib, 1)}


@dataclass
class StageProfile:
    """Records stages as the progress callback announces them; forwards every call to ``progress``."""

    progress: object = None
    interval: float = 0.02
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self):
        self.start_rss = rss_bytes()  # what the process held before the run (interpreter, libraries)
        self._current: Stage | None = None
        self._t0 = 0.0
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="normdeploy-rss")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, r)

    def __call__(self, stage: str, fraction: float | None = None) -> None:
        if self._current is None or stage != self._current.name:
            self._close()
            self._current, self._t0 = Stage(stage), time.perf_counter()
            with self._lock:
                self._peak = rss_bytes()
        if self.progress is not None:
            self.progress(stage, fraction)

    def _close(self) -> None:
        if self._current is None:
            return
        r = rss_bytes()
        with self._lock:
            peak = max(self._peak, r)
        self._current.seconds = time.perf_counter() - self._t0
        self._current.rss_end, self._current.rss_peak = r, peak
        self.stages.append(self._current)
        self._current = None

    def finish(self) -> list[dict]:
        """Close the running stage, stop sampling; the stages as report.json holds them."""
        self._close()
        self._stop.set()
        return [s.to_json() for s in self.stages]

    def snapshot(self) -> list[dict]:
        """The stages closed so far and the running one (as measured until now), without stopping."""
        out = [s.to_json() for s in self.stages]
        if self._current is not None:
            with self._lock:
                peak = max(self._peak, rss_bytes())
            out.append(Stage(self._current.name, time.perf_counter() - self._t0, rss_bytes(), peak).to_json())
        return out
