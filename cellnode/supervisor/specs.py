"""Instance specs: the reference platform's configurations, or a site's own table.

A spec names what one instance gets: vCPUs, RAM, GPUs, and the units per second it costs. The table is the
reference's unless `CELLNODE_SPECS_FILE` names a JSON file of the same shape (`{"c1.4": {"vcpu": 4, "ram_gb": 32,
"gpus": 0, "units_per_second": 4}, ...}`).

On the local backend a spec becomes limits per instance: CPU threads (`OMP_NUM_THREADS` and the other libraries'
variables), GPU visibility (`CUDA_VISIBLE_DEVICES`), and a memory cap: the supervisor replaces an instance whose
resident memory passes its spec's RAM. CPU and memory may be overcommitted across instances on one machine, so that
`c1.4` works on a laptop (`CELLNODE_OVERCOMMIT`, on by default; off, a node that would not fit is refused); GPUs may
not: a spec asking for more GPUs than the machine has is refused when the node is created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cellnode.exceptions import ConfigError, FailedPrecondition, InvalidArgument

DEFAULT_SPEC = "c1.4"
GIB = 2**30  # a spec's "GB" of RAM, as cloud configurations count it
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


@dataclass(frozen=True)
class Spec:
    name: str
    vcpu: int
    ram_gb: float
    gpus: int
    units_per_second: float

    @property
    def memory_cap(self) -> int:
        """Bytes of resident memory one instance may hold."""
        return int(self.ram_gb * GIB)

    def environment(self, cpus_here: int) -> dict[str, str]:
        """The variables that hold an instance to this spec on a machine with `cpus_here` CPUs."""
        threads = str(max(1, min(self.vcpu, cpus_here)))
        env = dict.fromkeys(THREAD_VARIABLES, threads)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(self.gpus))
        return env


# The reference platform's table (docs: configurations and pricing).
REFERENCE_SPECS = {
    spec.name: spec
    for spec in (
        Spec("c1.4", 4, 32, 0, 4),
        Spec("c1.8", 8, 64, 0, 8),
        Spec("c1.32", 32, 256, 0, 32),
        Spec("c1.80", 80, 640, 0, 80),
        Spec("g1.1", 8, 48, 1, 72),
        Spec("g1.2", 16, 96, 2, 144),
        Spec("g1.4", 32, 192, 4, 288),
        Spec("g2.1", 28, 119, 1, 116),
        Spec("g2.2", 56, 238, 2, 232),
        Spec("g2.4", 112, 476, 4, 464),
        Spec("g2.8", 224, 952, 8, 928),
    )
}


def load_specs(path: Path | None) -> dict[str, Spec]:
    """The spec table in force: the reference's, or the site's file."""
    if path is None:
        return dict(REFERENCE_SPECS)
    try:
        raw = json.loads(path.read_text())
        return {
            name: Spec(name, int(v["vcpu"]), float(v["ram_gb"]), int(v.get("gpus", 0)), float(v["units_per_second"]))
            for name, v in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"Cannot read the spec table {str(path)!r} (CELLNODE_SPECS_FILE): {exc}. It must be a JSON object of "
            '{"name": {"vcpu": 4, "ram_gb": 32, "gpus": 0, "units_per_second": 4}}.'
        ) from exc


def check_spec(specs: dict[str, Spec], name: str, gpus_here: int) -> Spec:
    """The spec named, if this machine can run it; a message naming the value and the fix otherwise."""
    spec = specs.get(name)
    if spec is None:
        raise InvalidArgument(f"Unknown spec {name!r}; choose one of {', '.join(specs)}.")
    if spec.gpus > gpus_here:
        raise FailedPrecondition(
            f"Spec {name!r} needs {spec.gpus} GPU(s) and this machine has {gpus_here}. Choose a CPU spec such as "
            f"{DEFAULT_SPEC!r}, or run the node on a server with GPUs."
        )
    return spec


def count_gpus() -> int:
    """GPUs this machine has, as nvidia-smi lists them (0 without it)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def count_cpus() -> int:
    return len(os.sched_getaffinity(0))


def machine_capacity() -> tuple[int, float]:
    """This machine's CPUs (those the server may use) and RAM in GB."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    return count_cpus(), ram
