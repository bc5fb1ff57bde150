"""What every benchmark measures the same way: wall time (median of repeats) and peak memory."""

import atexit
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil


def work_folder(given: Path | None, prefix: str) -> Path:
    """The folder a benchmark writes into: ``given`` is kept (a rerun reuses the catalogue in
    it); a temporary one is removed when the process exits, since a 10M-star run leaves
    gigabytes behind and repeated runs once filled the disk CI shares."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Median wall time of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


class PeakRss:
    """Peak resident memory of a benchmark's driver (this Python process) and of its Spark JVM,
    and the CPU seconds the driver and all its descendants (the JVM, Spark's Python workers)
    spent while the ``with`` block ran.

    Sampled every 100 ms by a thread while the ``with`` block runs, so a figure belongs to one
    phase of a benchmark, not to everything the process did before it. ``python_start`` is the
    driver's RSS when the phase began: the growth during the phase is ``python - python_start``.
    ``cpu_seconds`` sums each process's user and system time over the phase (a process that
    exits between two samples loses at most its last 100 ms). On a shared machine it is the
    figure other work does not inflate, while wall time is.
    """

    def __init__(self, interval: float = 0.1):
        self.me = psutil.Process()
        self.interval = interval
        self.python = self.python_start = self.jvm = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(last - self._cpu_start.get(pid, 0.0) for pid, last in self._cpu_last.items())

    def _cpu(self) -> dict[int, float]:
        seen = {}
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seen[process.pid] = times.user + times.system
        return seen

    def _sample(self) -> None:
        self.python = max(self.python, self.me.memory_info().rss)
        jvm = 0
        for child in self.me.children(recursive=True):
            try:
                if "java" in child.name():
                    jvm += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        self.jvm = max(self.jvm, jvm)
        self._cpu_last.update(self._cpu())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.python_start = self.me.memory_info().rss
        self._cpu_start = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
