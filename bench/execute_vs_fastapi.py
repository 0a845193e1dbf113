"""Throughput and latency of cellnode's execute call against the same service hand-written with FastAPI.

Run by hand, not by CI (it installs Debian's `wrk` if it is missing, and takes about
rounds x 2 x (duration + warm-up) seconds plus ~15 s of set-up):

    .venv/bin/python bench/execute_vs_fastapi.py [--duration 10] [--rounds 3] [--connections 16]

It starts a real `cellnode serve --port 0` with the randomizer node deployed from examples/randomizer.ipynb, and
bench/fastapi_randomizer.py under uvicorn, checks that both answer the documented call, then drives them with
`wrk` in alternating rounds on 127.0.0.1. It prints a table and writes bench/results/execute_vs_fastapi.json
(one entry per connection count, so runs at several counts accumulate). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
import psutil

from cellnode import Client

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "randomizer.ipynb"
FASTAPI_APP = ROOT / "bench" / "fastapi_randomizer.py"
LUA_SCRIPT = ROOT / "bench" / "wrk_post.lua"
RESULTS = ROOT / "bench" / "results" / "execute_vs_fastapi.json"
DRAIN_SECONDS = 1.0
URL_LINE = re.compile(r"serving (http://\S+)")
INPUT = {"input_data": {"left_bound": 1, "right_bound": 10}}
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
SYSTEMS = ("cellnode", "fastapi")
TARGET_RATIO = 0.7


@dataclass
class Target:
    """One system under test: where to POST, with what body and token, and whose CPU time to count."""

    name: str
    url: str
    body: str
    token: str
    pid: int
    script: Path = LUA_SCRIPT  # the wrk script; it reads BENCH_BODY, BENCH_TOKEN and `env` from the environment
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class WrkRun:
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    cpu_s: float  # user + system CPU time of the server's process tree during the run
    cpu_us_per_request: float
    child_cpu_us_per_request: float  # the part spent in child processes: cellnode's instance

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass
class Summary:
    median_requests_per_s: float
    median_p50_ms: float
    median_p99_ms: float
    median_cpu_us_per_request: float
    median_child_cpu_us_per_request: float
    rounds_requests_per_s: list[float]
    errors: int
    runs: list[WrkRun] = field(default_factory=list)


# -- processes


class Server:
    """A server subprocess in a session of its own (a Ctrl-C reaches it only through us); output kept in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()

    def output(self) -> str:
        return "".join(self.lines)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.output()}")

    def wait_healthy(self, url: str, path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_running()
            with suppress(httpx.HTTPError):
                if httpx.get(url + path, timeout=1, trust_env=False).status_code < 500:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {path} within {START_TIMEOUT:g} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM and wait; then wait for its children too (cellnode's instances), killing any left after that."""
        children: list[psutil.Process] = []
        if self.proc.poll() is None:
            with suppress(psutil.Error):
                children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:g} s; killing it.", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT)
        for child in alive:
            print(f"{self.name} left process {child.pid} running; killing it.", file=sys.stderr)
            with suppress(psutil.Error):
                child.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELLNODE_")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        print("wrk is not installed; installing Debian's package (apt-get update && apt-get install -y wrk).")
        subprocess.run(["apt-get", "update"], check=True, timeout=600, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=600, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found is None:
            raise RuntimeError("apt-get installed wrk but it is not on PATH.")
    return found


def launch_cellnode(tmp: Path, servers: list[Server], **extra_env: str) -> tuple[Server, str, str]:
    """A `cellnode serve --port 0` on a temp data dir, answering /health: the server, its URL and the admin key.
    `extra_env` goes into its environment too (`DOCKER_HOST=...` for docker nodes)."""
    data_dir = tmp / "data"
    # TMPDIR: the local backend's runtime directory (sockets, launch specs) goes under ours, removed at the end.
    env = clean_env(
        CELLNODE_PROFILE=str(tmp / "profile.json"), CELLNODE_LOG_LEVEL="warning", TMPDIR=str(tmp), **extra_env
    )
    argv = [sys.executable, "-m", "cellnode", "serve", "--port", "0", "--data-dir", str(data_dir)]
    server = Server("cellnode serve", argv, env, tmp / "cellnode.log")
    servers.append(server)
    deadline = time.monotonic() + START_TIMEOUT
    url = ""
    while not url:
        server.check_running()
        if time.monotonic() > deadline:
            raise RuntimeError(f"cellnode serve printed no URL within {START_TIMEOUT:g} s:\n{server.output()}")
        match = next((m for m in map(URL_LINE.search, list(server.lines)) if m), None)
        url = match.group(1) if match else ""
        time.sleep(0.05)
    server.wait_healthy(url, "/health")
    return server, url, (data_dir / "admin.key").read_text().strip()


def start_cellnode(tmp: Path, servers: list[Server]) -> Target:
    server, url, key = launch_cellnode(tmp, servers)
    with Client(url, key) as client:
        client.create_checkpoint(NOTEBOOK, name="randomizer-checkpoint")
        node = client.create_node(
            "randomizer-node",
            checkpoint="randomizer-checkpoint",
            inputs={"input_data": "dict"},
            outputs={"output_data": "dict"},
        )
        token: str = client.create_token()["iam_token"]
    body = json.dumps({"folder_id": node["folder_id"], "input": INPUT})
    return Target("cellnode", f"{url}/datasphere/v1/nodes/{node['id']}:execute", body, token, server.proc.pid)


def start_fastapi(tmp: Path, servers: list[Server]) -> Target:
    token = secrets.token_urlsafe(48)
    port = free_port()
    argv = [sys.executable, str(FASTAPI_APP), f"--port={port}", f"--token={token}"]
    server = Server("fastapi_randomizer", argv, clean_env(), tmp / "fastapi.log")
    servers.append(server)
    url = f"http://127.0.0.1:{port}"
    server.wait_healthy(url, "/docs")
    body = json.dumps({"folder_id": "bench-folder", "input": INPUT})
    return Target("fastapi", f"{url}/datasphere/v1/nodes/randomizer-node:execute", body, token, server.proc.pid)


# -- checks and measurement


def verify(target: Target, calls: int = 50) -> None:
    """The documented call answers `{"output": {"output_data": {"generated_value": N}}}` with 1 <= N <= 10."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    seen = set()
    with httpx.Client(timeout=10, trust_env=False) as http:
        for _ in range(calls):
            response = http.post(target.url, content=target.body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{target.name} answered {response.status_code}: {response.text}")
            data = response.json()
            value = data.get("output", {}).get("output_data", {}).get("generated_value")
            shape_ok = data.keys() == {"output"} and data["output"].keys() == {"output_data"}
            if not shape_ok or data["output"]["output_data"].keys() != {"generated_value"}:
                raise RuntimeError(f"{target.name} answered an unexpected shape: {data}")
            if type(value) is not int or not 1 <= value <= 10:
                raise RuntimeError(f"{target.name} answered generated_value={value!r}, not an int in [1, 10]")
            seen.add(value)
        bad = http.post(target.url, content=target.body, headers={**headers, "Authorization": "Bearer wrong"})
        if bad.status_code != 401:
            raise RuntimeError(f"{target.name} answered {bad.status_code} to a wrong token, not 401")
    if len(seen) < 2:
        raise RuntimeError(f"{target.name} answered {calls} calls with the same value {seen}; is it random?")
    print(f"  {target.name}: {calls} calls answered correctly (values seen: {sorted(seen)}); a wrong token gets 401")


UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
DURATION = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


def to_ms(text: str) -> float:
    match = DURATION.match(text)
    if match is None:
        raise ValueError(f"Cannot read the wrk duration {text!r}")
    return float(match.group(1)) * UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    percentiles = {int(p): to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.M)}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    count = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rps is None or count is None or set(percentiles) != {50, 75, 90, 99}:
        raise ValueError(f"Cannot read the wrk output:\n{output}")
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    # wrk prints these two lines only when the count is not zero.
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if sockets is not None:
        socket_errors = dict(zip(socket_errors, map(int, sockets.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": float(rps.group(1)),
        "p50_ms": percentiles[50],
        "p75_ms": percentiles[75],
        "p90_ms": percentiles[90],
        "p99_ms": percentiles[99],
        "requests": int(count.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors,
    }


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of a process and of its descendants (cellnode's instance is a child)."""
    root = psutil.Process(pid)
    totals = [0.0, 0.0]
    for index, proc in [(0, root), *((1, child) for child in root.children(recursive=True))]:
        with suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            totals[index] += times.user + times.system
    return totals[0], totals[1]


def run_wrk(wrk: str, target: Target, *, duration: int, connections: int, threads: int) -> tuple[str, float, float]:
    """wrk's output, and the CPU seconds the server and its children used meanwhile."""
    env = {**os.environ, "BENCH_BODY": target.body, "BENCH_TOKEN": target.token, **target.env}
    argv = [
        wrk,
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={duration}s",
        "--timeout=5s",
        "--latency",
        f"--script={target.script}",
        target.url,
    ]
    server_before, children_before = tree_cpu_seconds(target.pid)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    server_after, children_after = tree_cpu_seconds(target.pid)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout, server_after - server_before, children_after - children_before


def warm_up(wrk: str, target: Target, args: argparse.Namespace) -> None:
    """A discarded run, then a pause: wrk stops with requests under way, which the server still finishes (a client
    that leaves before its answer's head does not cancel it), and they would count in the node's queue at the start
    of the measured run."""
    if args.warmup > 0:
        run_wrk(wrk, target, duration=args.warmup, connections=args.connections, threads=args.threads)
        time.sleep(DRAIN_SECONDS)


def measure(wrk: str, target: Target, args: argparse.Namespace) -> WrkRun:
    warm_up(wrk, target, args)
    output, server_cpu, child_cpu = run_wrk(
        wrk, target, duration=args.duration, connections=args.connections, threads=args.threads
    )
    parsed = parse_wrk(output)
    per_request = 1e6 / parsed["requests"] if parsed["requests"] else 0.0
    run = WrkRun(
        **parsed,
        cpu_s=server_cpu + child_cpu,
        cpu_us_per_request=(server_cpu + child_cpu) * per_request,
        child_cpu_us_per_request=child_cpu * per_request,
    )
    if run.errors:
        print(
            f"\n!!! {target.name}: {run.non_2xx} non-2xx responses and socket errors {run.socket_errors} "
            f"in this run; its figures are not valid !!!\n{output}",
            file=sys.stderr,
        )
    return run


def summarize(runs: list[WrkRun]) -> Summary:
    return Summary(
        median_requests_per_s=statistics.median(r.requests_per_s for r in runs),
        median_p50_ms=statistics.median(r.p50_ms for r in runs),
        median_p99_ms=statistics.median(r.p99_ms for r in runs),
        median_cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in runs),
        median_child_cpu_us_per_request=statistics.median(r.child_cpu_us_per_request for r in runs),
        rounds_requests_per_s=[r.requests_per_s for r in runs],
        errors=sum(r.errors for r in runs),
        runs=runs,
    )


def machine() -> dict[str, Any]:
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "wrk": wrk_version[0].strip() if wrk_version else "?",
        "versions": {name: version(name) for name in ("cellnode", "fastapi", "starlette", "uvicorn", "pydantic")},
    }


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def report(summaries: dict[str, Summary], info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cell, fast = summaries["cellnode"], summaries["fastapi"]
    ratios = {
        "throughput": cell.median_requests_per_s / fast.median_requests_per_s,
        "p50_latency": cell.median_p50_ms / fast.median_p50_ms,
        "p99_latency": cell.median_p99_ms / fast.median_p99_ms,
        "cpu_per_request": cell.median_cpu_us_per_request / fast.median_cpu_us_per_request,
    }
    print(
        f"\nexecute: cellnode vs FastAPI — {args.connections} connections, {args.duration:g} s x {args.rounds} "
        f"rounds (warm-up {args.warmup:g} s), wrk {min(args.threads, args.connections)} threads"
    )
    print(
        f"machine: nproc {info['nproc']} ({info['cpu_model']}), Python {info['python']}, "
        f"fastapi {info['versions']['fastapi']}, uvicorn {info['versions']['uvicorn']}"
    )
    header = (
        f"{'system':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} {'(children)':>10}  rounds req/s"
    )
    print(header)
    print("-" * len(header))
    for name, s in summaries.items():
        rounds = ", ".join(f"{x:.0f}" for x in s.rounds_requests_per_s)
        print(
            f"{name:<10} {s.median_requests_per_s:>9.0f} {s.median_p50_ms:>8.2f} {s.median_p99_ms:>8.2f} "
            f"{s.median_cpu_us_per_request:>10.0f} {s.median_child_cpu_us_per_request:>10.0f}  {rounds}"
        )
    verdict = "meets" if ratios["throughput"] >= TARGET_RATIO else "BELOW"
    print(
        f"cellnode/FastAPI: throughput {ratios['throughput']:.2f}x ({verdict} the {TARGET_RATIO}x target), "
        f"p50 latency {ratios['p50_latency']:.2f}x, p99 latency {ratios['p99_latency']:.2f}x, "
        f"CPU per request {ratios['cpu_per_request']:.2f}x (medians)"
    )
    errors = {name: s.errors for name, s in summaries.items() if s.errors}
    if errors:
        print(f"\n!!! ERRORS during measurement: {errors}; these figures are not valid !!!", file=sys.stderr)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            **wrk_settings(args),
        },
        "machine": info,
        "systems": {name: asdict(s) for name, s in summaries.items()},
        "ratios_cellnode_over_fastapi": ratios,
        "errors": errors,
    }


def wrk_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The wrk options of a run, as the results record them."""
    return {
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "wrk_threads": min(args.threads, args.connections),
        "warmup_s": args.warmup,
    }


def save(entry: dict[str, Any], path: Path = RESULTS) -> None:
    """Keep one entry per connection count in the results file, so runs at several counts sit side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing: dict[str, Any] = {}
    with suppress(OSError, ValueError):
        existing = json.loads(path.read_text())
    by_connections = existing.get("by_connections") if isinstance(existing.get("by_connections"), dict) else {}
    assert isinstance(by_connections, dict)
    by_connections[str(entry["settings"]["connections"])] = entry
    path.write_text(json.dumps({"by_connections": by_connections}, indent=2) + "\n")
    print(f"\nResults written to {path.relative_to(ROOT)}")


# -- main


def run_bench(body: Callable[[list[Server], Path], int]) -> int:
    """Run a benchmark's `body(servers, tmp)`: the servers it starts go into `servers`, its files into `tmp`; both
    are cleaned up on any exit, and Ctrl-C or SIGTERM stops it with exit status 130."""
    servers: list[Server] = []
    tmp = Path(tempfile.mkdtemp(prefix="cellnode-bench-"))
    try:
        with sigterm_as_interrupt():
            return body(servers, tmp)
    except KeyboardInterrupt:
        print("\nInterrupted; stopping the servers.", file=sys.stderr)
        return 130
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the benchmark stops it like a Ctrl-C, so the servers are still stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args() -> argparse.Namespace:
    return parse_wrk_args(__doc__, duration=10, per="system")


def parse_wrk_args(
    description: str | None,
    *,
    duration: int,
    per: str,
    extra: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """The wrk options every benchmark here takes, with this one's default duration; `extra` adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument(
        "--duration", type=int, default=duration, help=f"seconds of each measured wrk run (default {duration})"
    )
    parser.add_argument("--rounds", type=int, default=3, help=f"alternating rounds per {per} (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads, at most --connections (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of discarded wrk run before each (default 2)")
    args = parser.parse_args()
    for flag in ("duration", "rounds", "connections", "threads", "warmup"):
        least = 0 if flag == "warmup" else 1
        if getattr(args, flag) < least:
            parser.error(f"--{flag} is {getattr(args, flag)}; give {least} or more")
    return args


def main() -> int:
    args = parse_args()
    wrk = ensure_wrk()

    def body(servers: list[Server], tmp: Path) -> int:
        print("Starting cellnode serve and deploying randomizer-node ...")
        targets = {"cellnode": start_cellnode(tmp, servers)}
        print("Starting bench/fastapi_randomizer.py ...")
        targets["fastapi"] = start_fastapi(tmp, servers)
        print("Checking both answer the documented call:")
        for target in targets.values():
            verify(target)
        runs: dict[str, list[WrkRun]] = {name: [] for name in SYSTEMS}
        for round_number in range(1, args.rounds + 1):
            for name in SYSTEMS:
                for server in servers:
                    server.check_running()
                run = measure(wrk, targets[name], args)
                runs[name].append(run)
                print(
                    f"  round {round_number}/{args.rounds} {name:<8}: {run.requests_per_s:>8.0f} req/s, "
                    f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                    f"{run.cpu_us_per_request:.0f} CPU us/req, errors {run.errors}"
                )
        entry = report({name: summarize(runs[name]) for name in SYSTEMS}, machine(), args)
        save(entry)
        return 1 if entry["errors"] else 0

    return run_bench(body)


if __name__ == "__main__":
    sys.exit(main())
