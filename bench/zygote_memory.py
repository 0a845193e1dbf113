"""Memory (PSS) and start time of a node's instances forked from one zygote, against independent instance processes.

Run by hand, not by CI (about 6 GiB of memory at its peak, about a minute):

    .venv/bin/python bench/zygote_memory.py [--gib 1.0] [--instances 4] [--starts 10]

It writes a checkpoint whose one variable is a random float64 numpy array of `--gib` GiB (cloudpickle, as a capture
does), and a cell that reads all of it (`total = float(big.sum())`). Through `LocalBackend` it starts one instance
(the zygote loads the checkpoint, the instance is forked), runs one request, and sums the PSS of the zygote and the
instance (`/proc/PID/smaps_rollup`); then it brings the node to `--instances` instances, runs one request on each,
and sums again. It times `start()` + `wait_ready()` of `--starts` more instances from the ready zygote (each stopped
before the next). It does all this twice: as the backend starts zygotes, and with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the node's env (glibc's malloc then asks for transparent huge pages).
For comparison it then starts `--instances` standalone instances as the local backend did before zygotes
(`python -u -m cellnode.runtime SPEC`, each loading the checkpoint itself), one after the other, and sums their PSS
after one request each. It prints a table and writes bench/results/zygote_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from cellnode.backends.base import InstanceSpec
from cellnode.backends.local import LocalBackend, LocalInstanceHandle, instance_env
from cellnode.runtime.protocol import EXECUTE, OK, recv_frame, send_frame

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "zygote_memory.json"
CELL = "total = float(big.sum())"
TARGET_RATIO = 1.3
# In a node's env: glibc's malloc asks for transparent huge pages for its large mappings (THP mode "madvise").
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
FORKED_LINE = re.compile(r"Instance '(\S+)' of node '\S+' forked from zygote \d+ in ([\d.]+) ms")


def pss_kib(pid: int) -> int:
    """The proportional set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line; this benchmark needs Linux 4.14 or later.")


def gib(kib: int) -> float:
    return kib / (1 << 20)


def write_checkpoint(directory: Path, size_gib: float) -> dict[str, Any]:
    """A launch spec whose one variable `big` is a random array of `size_gib` GiB."""
    big = np.random.default_rng(0).random(int(size_gib * (1 << 30)) // 8)
    blob = cloudpickle.dumps(big)
    del big
    path = directory / "big.pkl"
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    del blob
    return {
        "node_id": "big",
        "cell": {"source": CELL, "uses_ipython": False},
        "inputs": {},
        "outputs": {"total": "float"},
        "variables": [{"name": "big", "path": str(path), "sha256": digest}],
        "imports": {"np": "numpy"},
    }


def execute(address: str, timeout: float = 600.0) -> float:
    """Run the cell once; connecting is retried, since a standalone instance's socket file appears before listen()."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        while True:
            try:
                conn.connect(address)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        send_frame(conn, EXECUTE, b"{}")
        frame = recv_frame(conn)
    assert frame is not None and frame[0] == OK, frame
    return float(json.loads(frame[1])["total"])


async def forked(launch: dict[str, Any], log: Path, count: int, starts: int, env: dict[str, str]) -> dict[str, Any]:
    async with LocalBackend() as backend:

        async def start(instance_id: str) -> tuple[LocalInstanceHandle, float]:
            began = time.perf_counter()
            handle = await backend.start(InstanceSpec("big", instance_id, launch, log_path=log, env=env))
            await handle.wait_ready(600)
            return handle, time.perf_counter() - began

        first, cold = await start("i0")
        zygote_pid = first.zygote.process.pid
        await asyncio.to_thread(execute, first.address)
        one = pss_kib(zygote_pid) + pss_kib(first.pid or 0)
        handles = [first]
        for number in range(1, count):
            handle, _ = await start(f"i{number}")
            handles.append(handle)
            await asyncio.to_thread(execute, handle.address)
        many = pss_kib(zygote_pid) + sum(pss_kib(handle.pid or 0) for handle in handles)
        per_process = {"zygote": gib(pss_kib(zygote_pid)), "instances": [gib(pss_kib(h.pid or 0)) for h in handles]}
        times = []
        for number in range(starts):
            handle, seconds = await start(f"s{number}")
            times.append(seconds)
            await handle.stop()
    text = "".join(path.read_text() for path in sorted(log.glob("*.log*")))  # one file per process
    fork_ms = [float(ms) for name, ms in FORKED_LINE.findall(text) if name.startswith("s")]
    return {
        "cold_start_s": cold,
        "pss_1_gib": gib(one),
        f"pss_{count}_gib": gib(many),
        "ratio": many / one,
        "pss_per_process_gib": per_process,
        "add_instance_ms": [1000 * t for t in times],
        "add_instance_median_ms": 1000 * statistics.median(times),
        "fork_in_zygote_median_ms": statistics.median(fork_ms) if fork_ms else None,
    }


def standalone(launch: dict[str, Any], directory: Path, log: Path, count: int) -> dict[str, Any]:
    """The local backend before zygotes: one process per instance, each loading the checkpoint."""
    processes: list[subprocess.Popen[bytes]] = []
    times: list[float] = []
    try:
        with open(log, "ab") as out:
            for number in range(count):
                address = str(directory / f"old{number}.sock")
                spec_path = directory / f"old{number}.json"
                spec_path.write_text(json.dumps({**launch, "instance_id": f"old{number}", "socket": address}))
                began = time.perf_counter()
                command = [sys.executable, "-u", "-m", "cellnode.runtime", str(spec_path)]
                process = subprocess.Popen(command, stdout=out, stderr=out, env=instance_env({}))
                processes.append(process)
                while not os.path.exists(address):
                    assert process.poll() is None, f"The standalone instance exited with {process.returncode}."
                    time.sleep(0.005)
                times.append(time.perf_counter() - began)
                execute(address)
        one = pss_kib(processes[0].pid)
        many = sum(pss_kib(process.pid) for process in processes)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    return {
        "pss_1_gib": gib(one),
        f"pss_{count}_gib": gib(many),
        "ratio": many / one,
        "start_s": times,
        "start_median_s": statistics.median(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="Size of the array in GiB. Defaults to 1.0.")
    parser.add_argument("--instances", type=int, default=4, help="Instances to compare with one. Defaults to 4.")
    parser.add_argument("--starts", type=int, default=10, help="Timed instance starts. Defaults to 10.")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="cn-bench-"))
    try:
        began = time.perf_counter()
        launch = write_checkpoint(directory, args.gib)
        print(f"Checkpoint of {args.gib:g} GiB written in {time.perf_counter() - began:.1f} s.", flush=True)
        new = asyncio.run(forked(launch, directory / "node-logs", args.instances, args.starts, {}))
        huge = asyncio.run(forked(launch, directory / "huge-logs", args.instances, args.starts, HUGE_PAGES))
        old = standalone(launch, directory, directory / "old.log", args.instances)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    n = args.instances
    print(f"\n| way | PSS 1 (GiB) | PSS {n} (GiB) | PSS {n}/1 | start an instance |")
    print("|---|---:|---:|---:|---:|")
    for name, way in (("zygote + fork", new), ("zygote + fork, THP malloc", huge)):
        print(
            f"| {name} | {way['pss_1_gib']:.3f} | {way[f'pss_{n}_gib']:.3f} | **{way['ratio']:.2f}** | "
            f"{way['add_instance_median_ms']:.1f} ms (fork {way['fork_in_zygote_median_ms']:.1f} ms; "
            f"cold zygote + first: {way['cold_start_s']:.2f} s) |"
        )
    print(
        f"| {n} processes, each loading | {old['pss_1_gib']:.3f} | {old[f'pss_{n}_gib']:.3f} | {old['ratio']:.2f} | "
        f"{old['start_median_s']:.2f} s |"
    )
    print(f"\nPer process (zygote + fork, {n} instances): {new['pss_per_process_gib']}")
    print(f"Add-instance times (ms): {', '.join(f'{t:.1f}' for t in new['add_instance_ms'])}")
    verdict = "met" if new["ratio"] <= TARGET_RATIO else "MISSED"
    print(f"Target PSS({n})/PSS(1) <= {TARGET_RATIO}: {verdict}.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "gib": args.gib,
        "instances": n,
        "zygote": new,
        "zygote_thp_malloc": huge,
        "standalone": old,
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if new["ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
