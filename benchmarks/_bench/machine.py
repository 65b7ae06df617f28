"""What a run records about where it ran: CPU, SIMD flags, memory, load average, package
versions and pyqlora's build configuration (figures from another machine, or a busy
one, are not comparable)."""
import importlib.metadata
import os
import platform
import re
import subprocess
import sys

VERSIONED_PACKAGES = ("pyqlora", "numpy", "ml_dtypes", "torch", "bitsandbytes", "torchao", "matplotlib")


def machine_info():
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "cpus_online": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average_1_5_15_min": os.getloadavg()}  # other work on the machine skews the figures
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(fields.get("Flags", "").split())
    info["cpu_model"] = fields.get("Model name", platform.processor() or "unknown")
    info["cores_per_socket"] = fields.get("Core(s) per socket")
    info["threads_per_core"] = fields.get("Thread(s) per core")
    info["l3_cache"] = fields.get("L3 cache")
    info["hypervisor"] = fields.get("Hypervisor vendor")
    interesting = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
    info["cpu_flags"] = [f for f in interesting if f in flags]
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def versions():
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def pyqlora_config():
    import pyqlora as pq

    with open(os.devnull, "w") as devnull:
        return pq.show_config(file=devnull)


def disk_read_rate(path):
    """(bytes per second, how) of a sequential read of `path` that bypasses the page cache: ``dd iflag=direct``,
    or, where the file system refuses O_DIRECT (tmpfs), ``dd`` after dropping the file's cached pages."""
    for flags, how in ((["iflag=direct"], "dd iflag=direct"), ([], "dd after posix_fadvise(DONTNEED)")):
        drop_cache(path)
        done = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", *flags], capture_output=True,
                              text=True)
        m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
        if done.returncode == 0 and m:
            return int(m.group(1)) / max(float(m.group(2)), 1e-9), how
    raise OSError(f"dd could not read {path}: {done.stderr.strip()}")


def drop_cache(path):
    """Drop the page cache of one file (its clean pages), so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
