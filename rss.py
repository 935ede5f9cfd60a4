"""rss.py: a process's anonymous resident memory (RssAnon in /proc/<pid>/status), sampled for its peak.

    sampler = rss.AnonPeak(); sampler.start(); ...; peak = sampler.stop()   # this process, bytes
    sampler = rss.AnonPeak(child.pid)                                      # another process

RssAnon is the process's own memory, not the page cache its file reads fill, so it is what a
machine must hold for the program. None where /proc is missing (not Linux).
"""
import threading
import time


class AnonPeak(threading.Thread):
    """Samples a process's RssAnon every `interval` seconds and keeps the peak, in bytes."""

    def __init__(self, pid="self", interval=0.002):
        super().__init__(daemon=True)
        self.pid, self.interval, self.running = pid, interval, True
        self.peak = self.current()

    def current(self):
        """RssAnon now, in bytes; None once the process has ended (or without /proc)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                line = next(line for line in f if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return None
        return int(line.split()[1]) * 1024

    def run(self):
        while self.running:
            now = self.current()
            if now is None and self.pid == "self":
                return
            self.peak = max(self.peak or 0, now or 0)
            time.sleep(self.interval)

    def stop(self):
        self.running = False
        self.join()
        now = self.current()
        return self.peak if now is None else max(self.peak or 0, now)
