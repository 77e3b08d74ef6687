"""What every benchmark prints beside its figures: the machine it ran on."""

from __future__ import annotations

import json
import os
import pathlib
import platform


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """{"cpu": model name, "cores": usable cores}."""
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))}


def print_summary(summary: dict[str, object]) -> None:
    """A benchmark's last line: its figures and the machine (`machine`) as one JSON object."""
    print(json.dumps({**summary, **machine()}))
