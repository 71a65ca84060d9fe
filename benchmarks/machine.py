"""What the benchmarks say about the machine they ran on."""

import os


def print_load(end: bool = False) -> None:
    """Prints the 1-minute load average, which says how busy the machine was."""
    if not hasattr(os, "getloadavg"):
        return
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = ("  (busier than the core count: other programs compete, expect noise)"
            if load > cores else "")
    print(f"load average {'at the end' if end else 'at the start'}: {load:.2f} "
          f"on {cores} cores{busy}")
