"""Resident memory of this process, in bytes, as the benchmarks report it (Linux).

``reset_peak_rss`` sets the kernel's high-water mark back to the current RSS, so that
``peak_rss_bytes`` (VmHWM) covers one phase. getrusage's ru_maxrss (``max_rss_bytes``)
is taken from the same mark while the process lives, so a reset lowers it too.
"""
import resource


def rss_bytes():
    """Resident memory now (statm's resident pages: the same count as VmRSS)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes():
    """VmHWM: the peak resident memory since the process started or since ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def max_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
