"""Per-request cost of each state policy (isolated, persistent, fork), through `Instance.execute`.

Run by hand, not by CI (about a minute, about 1 GiB of memory at its peak):

    .venv/bin/python bench/state_policies.py [--requests 2000] [--fork-requests 500] [--mib 200]

Two nodes: the reference randomizer (a small cell that seeds, draws a number and prints it), and a node whose
checkpoint also holds a random float64 numpy array of `--mib` MiB, whose cell reads one element (`y = float(big[x])`).
For each node and policy it starts one instance through `LocalBackend`, as the supervisor does, connects an
`Instance` (the front's side), warms up, then times `--requests` sequential `Instance.execute` calls (`--fork-requests`
under `fork`), each with its own request ID, and prints the median and p99 in µs, and the CPU time the instance (and,
under `fork`, its children) used per request. It writes bench/results/state_policies.json.

Run it with `PYTHONPATH` pointing at another checkout to measure that code (policies it does not know fall back to its
default, and the request ID is only passed where `Instance.execute` takes one).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from cellnode.backends.base import InstanceSpec
from cellnode.backends.local import LocalBackend
from cellnode.checkpoint.notebook import code_cells, read_notebook
from cellnode.router.instance import Instance

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "state_policies.json"
POLICIES = ("isolated", "persistent", "fork")
WARMUP = 200
# The reference randomizer, as the example notebook has it.
RANDOMIZER_SETUP, RANDOMIZER_CELL = code_cells(
    read_notebook((ROOT / "examples" / "randomizer.ipynb").read_bytes(), "randomizer.ipynb")
)
BIG_CELL = "y = float(big[x])"


def blob(directory: Path, name: str, value: Any) -> dict[str, str]:
    data = cloudpickle.dumps(value)
    path = directory / f"{name}.pkl"
    path.write_bytes(data)
    return {"name": name, "path": str(path), "sha256": hashlib.sha256(data).hexdigest()}


def randomizer(directory: Path) -> tuple[dict[str, Any], bytes]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(RANDOMIZER_SETUP, namespace)
    launch = {
        "node_id": "small",
        "cell": {"source": RANDOMIZER_CELL, "uses_ipython": False},
        "inputs": {"input_data": "dict"},
        "outputs": {"output_data": "dict"},
        "variables": [blob(directory, "input_data", namespace["input_data"])],
        "imports": {},
    }
    return launch, json.dumps({"input_data": {"left_bound": 1, "right_bound": 10}}).encode()


def big(directory: Path, mib: int) -> tuple[dict[str, Any], bytes]:
    array = np.random.default_rng(0).random(mib * (1 << 20) // 8)
    launch = {
        "node_id": "big",
        "cell": {"source": BIG_CELL, "uses_ipython": False},
        "inputs": {"x": "int"},
        "outputs": {"y": "float"},
        "variables": [blob(directory, "big", array)],
        "imports": {"np": "numpy"},
    }
    return launch, b'{"x": 7}'


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def measure(launch: dict[str, Any], payload: bytes, policy: str, requests: int, logs: Path) -> dict[str, float]:
    takes_id = "request_id" in inspect.signature(Instance.execute).parameters
    async with LocalBackend() as backend:
        spec = InstanceSpec(launch["node_id"], f"{launch['node_id']}-{policy}", {**launch, "state": policy}, logs)
        handle = await backend.start(spec)
        await handle.wait_ready(600)
        instance = Instance(handle, timeout=60)
        await instance.connect()
        loop = asyncio.get_running_loop()
        times: list[float] = []
        try:
            for number in range(WARMUP + requests):
                if number == WARMUP:
                    cpu = cpu_seconds(handle.pid or 0)
                extra = {"request_id": f"r{number}"} if takes_id else {}
                began = time.perf_counter()
                await instance.execute(payload, deadline=loop.time() + 60, **extra)
                if number >= WARMUP:
                    times.append(time.perf_counter() - began)
            await instance.execute(payload, deadline=loop.time() + 60)  # Reaps the last child under fork.
            cpu = cpu_seconds(handle.pid or 0) - cpu
        finally:
            instance.close()
    times.sort()
    return {
        "median_us": 1e6 * statistics.median(times),
        "p99_us": 1e6 * times[int(len(times) * 0.99) - 1],
        "instance_cpu_us": 1e6 * cpu / (len(times) + 1),
        "requests": len(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="Timed requests per policy. Defaults to 2000.")
    parser.add_argument("--fork-requests", type=int, default=500, help="Timed requests under fork. Defaults to 500.")
    parser.add_argument("--mib", type=int, default=200, help="Size of the big node's array in MiB. Defaults to 200.")
    parser.add_argument("--policies", default=",".join(POLICIES), help="Comma-separated policies to measure.")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="cn-bench-"))
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        nodes = {"randomizer": randomizer(directory), f"{args.mib} MiB array": big(directory, args.mib)}
        for node, (launch, payload) in nodes.items():
            for policy in args.policies.split(","):
                requests = args.fork_requests if policy == "fork" else args.requests
                figures = asyncio.run(measure(launch, payload, policy, requests, directory / "logs" / node))
                results.setdefault(node, {})[policy] = figures
                print(
                    f"{node:>16} {policy:>10}: median {figures['median_us']:8.1f} µs, p99 {figures['p99_us']:8.1f} µs, "
                    f"instance CPU {figures['instance_cpu_us']:8.1f} µs",
                    flush=True,
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("\n| node | " + " | ".join(f"{p} median (p99) µs [CPU]" for p in results[next(iter(results))]) + " |")
    for node, policies in results.items():
        cells = " | ".join(
            f"{f['median_us']:.0f} ({f['p99_us']:.0f}) [{f['instance_cpu_us']:.0f}]" for f in policies.values()
        )
        print(f"| {node} | {cells} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "results": results,
    }
    RESULTS.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
