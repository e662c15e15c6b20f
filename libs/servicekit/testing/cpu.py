"""Where the CPU of a benchmark went, per process, for the benches under ``bench/``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import psutil  # type: ignore[import-untyped]

__all__ = ["CpuAccount"]


class CpuAccount:
    """CPU seconds used per process over a measurement: the named processes, the embedded broker (when
    this process started it) and PostgreSQL (every server process on the machine, so other work on it
    counts too). On a 2-core box they all compete. Processes that start or exit meanwhile are left out."""

    def __init__(self, pids: Mapping[str, int | Sequence[int]]) -> None:
        """``pids``: a process id, or several (replicas, summed), per name."""
        self.pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self.start = self._sample()

    def _sample(self) -> dict[tuple[str, int], float]:
        out = {(name, pid): _cpu(psutil.Process(pid)) for name, pids in self.pids.items() for pid in pids}
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.name().startswith("tansu"):
                    out[("broker", proc.pid)] = _cpu(proc)
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == "postgres":
                with contextlib.suppress(psutil.Error):
                    out[("postgresql", proc.pid)] = _cpu(proc)
        return out

    def report(self, units: int, unit: str = "order") -> tuple[str, float]:
        """The per-process line and the total CPU microseconds per unit."""
        end = self._sample()
        used: dict[str, float] = {}
        for key, cpu in end.items():
            if key in self.start:
                used[key[0]] = used.get(key[0], 0.0) + cpu - self.start[key]
        total = sum(used.values())
        parts = ", ".join(f"{k} {v / units * 1e6:,.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
        per = total / units * 1e6
        return f"CPU us/{unit}: {parts} (total {per:,.0f}; {total:.1f} CPU-s)", per


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)
