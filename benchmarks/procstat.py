"""Process memory figures from /proc (Linux), shared by the benchmark scripts."""

from __future__ import annotations


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size field in bytes: "VmRSS" (now) or "VmHWM" (the peak); 0 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the next piece of work's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
