"""What cellnode's pass-through to a docker node costs: the example service called directly at its container's port,
against the same call through `cellnode serve` with the header form.

Run by hand, not by CI, as root from the repository's root (it starts a private dockerd from tests/docker_engine.py,
installs Debian's `wrk`, docker.io and the test engine's other packages if they are missing, and takes about
rounds x 3 x (duration + warm-up) seconds plus ~30 s of set-up: about 2 minutes with the defaults):

    .venv/bin/python bench/passthrough_vs_direct.py [--duration 10] [--rounds 3] [--connections 16] [--no-alias]
        [--max-queue N] [--profile]

It builds the example service's image (examples/docker-node/app.py, FastAPI under uvicorn) without a registry,
starts a real `cellnode serve --port 0` on that engine, deploys the image as a docker node with one instance, and
drives the same `POST /predict` with `wrk` in alternating rounds on 127.0.0.1: `direct` at the container's own port,
`cellnode` through the server with `x-node-id`, `x-folder-id` and `Authorization: Bearer <IAM token>`, and `alias`
the same with `x-node-alias` instead. It prints a table and writes bench/results/passthrough_vs_direct.json (one entry
per connection count). See bench/README.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil
from alias_routing import Background, busy_rounds, machine_cpu_seconds, waited_children_cpu_seconds
from execute_vs_fastapi import (
    ROOT,
    Server,
    Summary,
    Target,
    WrkRun,
    ensure_wrk,
    launch_cellnode,
    machine,
    measure,
    parse_wrk_args,
    run_bench,
    run_wrk,
    save,
    summarize,
    tree_cpu_seconds,
    warm_up,
    wrk_settings,
)
from grpc_vs_rest import git

from cellnode import Client

sys.path.insert(0, str(ROOT))  # the test suite's Docker engine and image helpers
from tests.docker_engine import Engine, cache_root, ensure_packages, start_engine
from tests.docker_images import add_file_layer, build_service_image

EXAMPLE = ROOT / "examples" / "docker-node" / "app.py"
IMAGE = "cellnode-bench/example:1"
RUN_EXAMPLE = ["python3", "/app/app.py"]
PORT = 9875  # the example's own port; cellnode gives the instance another one in $PORT
# Probed every 2 s: under httpx's and uvicorn's 5 s keep-alive, so the health check keeps one connection open.
HEALTHCHECK = {"type": "http", "path": "/health-check", "interval": 2, "timeout": 1}
NODE_NAME = "bench-example"
ALIAS_NAME = "bench-example"
LUA_SCRIPT = ROOT / "bench" / "wrk_passthrough.lua"
RESULTS = ROOT / "bench" / "results" / "passthrough_vs_direct.json"
BODY = json.dumps({"values": [1, 2, 3]})
ANSWER = {"sum": 6.0, "mean": 2.0}
SYSTEMS = ("direct", "cellnode", "alias")
SAMPLE_S = 0.1  # how often the cellnode process's connections to the container are listed during a run
BENCH_CACHE = Path.home() / ".cache" / "cellnode-bench"  # XDG_CACHE_HOME when the test suite's cache is in use
SERVICE_PROBE = """\
import importlib.metadata as m, json, sys
names = ("fastapi", "starlette", "uvicorn", "pydantic", "h11", "httptools", "uvloop")
found = {}
for name in names:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = None
print(json.dumps({"python": sys.version.split()[0], **found}))
"""


@dataclass
class Deployment:
    url: str
    admin_key: str
    node_id: str
    instance_id: str
    routing_name: str
    max_queue: int
    container_port: int
    container_pid: int  # the container's init (docker-init), as `docker inspect` gives it
    cellnode_pid: int
    service: dict[str, Any]  # the service's Python and package versions, read inside the container
    targets: dict[str, Target]
    headers: dict[str, dict[str, str]]  # per system: what wrk sends besides Content-Type and Authorization


@dataclass
class Connections:
    """The TCP connections between the cellnode server process and the container's port during one measured run."""

    distinct: int  # different connections seen: open in a sample, or closed during the run
    most_open: int  # most of them open at once in one sample
    closed: int  # closed during the run (from TIME_WAIT)
    closed_by_cellnode: int  # of those, the ones cellnode closed first; the others the service closed
    samples: int
    requests: int  # the run's requests, for scale


@dataclass
class Run:
    wrk: WrkRun  # its CPU fields are cellnode's process tree plus the container's; "child" is the container's part
    cellnode_cpu_us_per_request: float
    cellnode_loop_cpu_us_per_request: float  # its main thread, the event loop: HTTP front, auth, proxy, health checks
    container_cpu_us_per_request: float
    engine_cpu_us_per_request: float  # dockerd, containerd and the container's shim: logs, not counted in the total
    connections: Connections
    background: Background


@dataclass
class System:
    summary: Summary
    median_p75_ms: float
    median_p90_ms: float
    median_cellnode_cpu_us_per_request: float
    median_cellnode_loop_cpu_us_per_request: float
    median_container_cpu_us_per_request: float
    median_engine_cpu_us_per_request: float
    connections: list[Connections] = field(default_factory=list)
    background: list[Background] = field(default_factory=list)


# -- CPU and connections


class ContainerCpu:
    """CPU seconds of the container's processes: its cgroup's counter (`cpuacct.usage` under cgroup v1, `usage_usec`
    of `cpu.stat` under v2), which also counts processes that came and went; or, if neither can be read, psutil on
    the container's init and its descendants (the processes are the host's)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.path, self.source = _cgroup_counter(pid)

    def seconds(self) -> float:
        if self.path is None:
            return sum(tree_cpu_seconds(self.pid))
        text = self.path.read_text()
        if self.path.name == "cpuacct.usage":
            return int(text) / 1e9
        usage = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec "))
        return int(usage) / 1e6


def _cgroup_counter(pid: int) -> tuple[Path | None, str]:
    candidates = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if "cpuacct" in controllers.split(","):
            for mount in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
                candidates.append(Path("/sys/fs/cgroup", mount, relative, "cpuacct.usage"))
        elif controllers == "":
            candidates += [
                Path("/sys/fs/cgroup", relative, "cpu.stat"),
                Path("/sys/fs/cgroup/unified", relative, "cpu.stat"),
            ]
    for candidate in candidates:
        with suppress(OSError, StopIteration, ValueError):
            text = candidate.read_text()
            if candidate.name == "cpu.stat":
                next(line for line in text.splitlines() if line.startswith("usage_usec "))
            else:
                int(text)
            return candidate, f"cgroup {candidate}"
    return None, f"psutil, process tree of PID {pid}"


def engine_cpu_seconds(engine: Engine, container_pid: int) -> float:
    """dockerd, its containerd, and the container's shim (its parent; not the container's processes)."""
    total = sum(tree_cpu_seconds(engine.process.pid))
    with suppress(psutil.Error):
        shim = psutil.Process(container_pid).parent()
        if shim is not None:
            times = shim.cpu_times()
            total += times.user + times.system
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread (the one whose ID is the process's)."""
    for thread in psutil.Process(pid).threads():
        if thread.id == pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


def time_wait_ports(port: int) -> set[tuple[int, bool]]:
    """The IPv4 loopback connections to `port` in TIME_WAIT, the ones that closed within the last 60 s: each as its
    client-side port, and whether the client closed it first (the side that closes first keeps the TIME_WAIT). No
    process owns those sockets any longer, so they are read from /proc/net/tcp."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "06":  # TIME_WAIT
            continue
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if remote == port:
            ports.add((local, True))
        elif local == port:
            ports.add((remote, False))
    return ports


class ConnectionWatch:
    """Counts the TCP connections between the cellnode server process and the container's port while it is open:
    the process's sockets listed with psutil every SAMPLE_S seconds, plus the connections that closed meanwhile (the
    kernel keeps those in TIME_WAIT), so that none is missed however short it lived."""

    def __init__(self, pid: int, port: int, *, count_closed: bool = True) -> None:
        self._process = psutil.Process(pid)
        self.port = port
        # Not when wrk calls the port itself (direct): its own connections close into TIME_WAIT at its end.
        self.count_closed = count_closed
        self.seen: set[int] = set()  # the connections' client-side ports
        self.most_open = 0
        self.samples = 0
        self.closed: set[tuple[int, bool]] = set()
        self._before: set[tuple[int, bool]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-watch", daemon=True)

    def __enter__(self) -> ConnectionWatch:
        self._before = time_wait_ports(self.port) if self.count_closed else set()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.count_closed:
            self.closed = time_wait_ports(self.port) - self._before

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(psutil.Error):
                ports = {
                    conn.laddr.port
                    for conn in self._process.net_connections("tcp4")
                    if conn.raddr and conn.raddr.port == self.port
                }
                self.seen |= ports
                self.most_open = max(self.most_open, len(ports))
                self.samples += 1
            self._stop.wait(SAMPLE_S)

    def result(self, requests: int) -> Connections:
        distinct = len(self.seen | {port for port, _ in self.closed})
        by_cellnode = sum(1 for _, client in self.closed if client)
        return Connections(distinct, self.most_open, len(self.closed), by_cellnode, self.samples, requests)


# -- set-up and checks


def pick_cache() -> Path:
    """The test suite's image cache, unless a test session holds its lock: then one of the benchmark's own (the
    images are built there once, from the Debian mirror and PyPI)."""
    lock_path = cache_root() / "docker.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{lock_path} is held (a test session is using that engine cache); using {BENCH_CACHE} instead.")
            os.environ["XDG_CACHE_HOME"] = str(BENCH_CACHE)
        else:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache_root()


def deploy(engine: Engine, tmp: Path, servers: list[Server], with_alias: bool, max_queue: int | None) -> Deployment:
    add_file_layer(engine, build_service_image(engine), "/app/app.py", EXAMPLE.read_bytes(), IMAGE)
    server, url, key = launch_cellnode(tmp, servers, DOCKER_HOST=engine.host)
    with Client(url, key) as client:
        node = client.create_docker_node(
            NODE_NAME,
            image=IMAGE,
            port=PORT,
            command=RUN_EXAMPLE,
            healthcheck=HEALTHCHECK,
            instances=1,
            max_queue=max_queue,
        )
        routing_name = (
            str(client.create_alias(ALIAS_NAME, nodes={node["id"]: 100})["routing_name"]) if with_alias else ""
        )
        token: str = client.create_token()["iam_token"]
    containers = engine.client.containers.list(filters={"label": f"cellnode.node_id={node['id']}"})
    if len(containers) != 1:
        raise RuntimeError(f"Expected one container of node {node['id']}, found {[c.name for c in containers]}")
    container = containers[0]
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    port, pid = int(env["PORT"]), int(container.attrs["State"]["Pid"])
    if env.get("CELLNODE_HOST") != "127.0.0.1" or container.attrs["HostConfig"]["NetworkMode"] != "host":
        raise RuntimeError(f"The container does not listen on host loopback: {env}, {container.attrs['HostConfig']}")
    probe = container.exec_run(["python3", "-c", SERVICE_PROBE])
    output = probe.output if isinstance(probe.output, bytes) else b""
    service = json.loads(output) if probe.exit_code == 0 else {"error": output.decode(errors="replace")}
    folder = {"x-folder-id": node["folder_id"]}
    headers = {
        "direct": {"x-node-id": node["id"], **folder},  # the service ignores them: the same request bytes
        "cellnode": {"x-node-id": node["id"], **folder},
        "alias": {"x-node-alias": routing_name, **folder},
    }
    urls = {"direct": f"http://127.0.0.1:{port}/predict", "cellnode": f"{url}/predict", "alias": f"{url}/predict"}
    targets = {
        name: Target(
            name,
            urls[name],
            BODY,
            token,
            server.proc.pid,  # the CPU measure() counts: cellnode's; the container's is added separately
            script=LUA_SCRIPT,
            env={"BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers[name].items())},
        )
        for name in (SYSTEMS if with_alias else SYSTEMS[:2])
    }
    for target in targets.values():
        if httpx.URL(target.url).host != "127.0.0.1":
            raise RuntimeError(f"{target.name} is at {target.url}, not on 127.0.0.1")
    instance_id = container.labels["cellnode.instance_id"]
    return Deployment(
        url,
        key,
        node["id"],
        instance_id,
        routing_name,
        int(node["max_queue"]),
        port,
        pid,
        server.proc.pid,
        service,
        targets,
        headers,
    )


def verify(dep: Deployment, target: Target, calls: int = 50) -> None:
    """The call answers the example's `{"sum": 6.0, "mean": 2.0, "instance": <the instance>}`; through cellnode, with
    an `x-request-id` (and for the alias an `x-node-id`), and a wrong token gets 401."""
    headers = {
        "Authorization": f"Bearer {target.token}",
        "Content-Type": "application/json",
        **dep.headers[target.name],
    }
    with httpx.Client(timeout=10, trust_env=False) as http:
        for _ in range(calls):
            response = http.post(target.url, content=target.body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{target.name} answered {response.status_code}: {response.text}")
            if response.json() != {**ANSWER, "instance": dep.instance_id}:
                raise RuntimeError(f"{target.name} answered {response.json()}, not {ANSWER} from {dep.instance_id}")
            if target.name != "direct" and not response.headers.get("x-request-id"):
                raise RuntimeError(f"{target.name}'s answer has no x-request-id: {dict(response.headers)}")
            if target.name == "alias" and response.headers.get("x-node-id") != dep.node_id:
                raise RuntimeError(f"alias answered with x-node-id {response.headers.get('x-node-id')!r}")
        note = ""
        if target.name != "direct":
            bad = http.post(target.url, content=target.body, headers={**headers, "Authorization": "Bearer wrong"})
            if bad.status_code != 401:
                raise RuntimeError(f"{target.name} answered {bad.status_code} to a wrong token, not 401")
            note = "; a wrong token gets 401"
    print(f"  {target.name}: {calls} calls answered {ANSWER} from instance {dep.instance_id}{note}")


# -- measurement


def measure_run(wrk: str, target: Target, dep: Deployment, engine: Engine, args: argparse.Namespace) -> Run:
    """A discarded warm-up, then a measured wrk run with the CPU of cellnode, the container, the engine and everything
    else counted, and the cellnode process's connections to the container watched."""
    warm_up(wrk, target, args)
    no_warmup = argparse.Namespace(**{**vars(args), "warmup": 0})
    container = ContainerCpu(dep.container_pid)
    me = psutil.Process()
    watch = ConnectionWatch(dep.cellnode_pid, dep.container_port, count_closed=target.name != "direct")
    with watch:
        (busy, steal), wrk_cpu, started = machine_cpu_seconds(), waited_children_cpu_seconds(), time.monotonic()
        own, inside, outside, loop = (
            sum(me.cpu_times()[:2]),
            container.seconds(),
            engine_cpu_seconds(engine, dep.container_pid),
            main_thread_cpu_seconds(dep.cellnode_pid),
        )
        run = measure(wrk, target, no_warmup)  # its CPU: cellnode's process tree
        loop = main_thread_cpu_seconds(dep.cellnode_pid) - loop
        inside = container.seconds() - inside
        outside = engine_cpu_seconds(engine, dep.container_pid) - outside
        own = sum(me.cpu_times()[:2]) - own
        elapsed = time.monotonic() - started
        busy_after, steal_after = machine_cpu_seconds()
        wrk_cpu = waited_children_cpu_seconds() - wrk_cpu
    per_request = 1e6 / run.requests if run.requests else 0.0
    others = busy_after - busy - run.cpu_s - inside - outside - wrk_cpu - own
    return Run(
        wrk=replace(
            run,
            cpu_s=run.cpu_s + inside,
            cpu_us_per_request=(run.cpu_s + inside) * per_request,
            child_cpu_us_per_request=inside * per_request,
        ),
        cellnode_cpu_us_per_request=run.cpu_s * per_request,
        cellnode_loop_cpu_us_per_request=loop * per_request,
        container_cpu_us_per_request=inside * per_request,
        engine_cpu_us_per_request=outside * per_request,
        connections=watch.result(run.requests),
        background=Background(round(others / elapsed, 3), round((steal_after - steal) / elapsed, 3)),
    )


def describe(run: Run) -> str:
    w = run.wrk
    return (
        f"{w.requests_per_s:>6.0f} req/s, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, CPU us/req "
        f"{w.cpu_us_per_request:.0f} = cellnode {run.cellnode_cpu_us_per_request:.0f} (its loop "
        f"{run.cellnode_loop_cpu_us_per_request:.0f}) + container {run.container_cpu_us_per_request:.0f}, "
        f"errors {w.errors}; cellnode-container connections {run.connections.distinct}; others used "
        f"{run.background.others_cores:.2f} cores"
    )


def system_of(runs: list[Run]) -> System:
    return System(
        summary=summarize([r.wrk for r in runs]),
        median_p75_ms=statistics.median(r.wrk.p75_ms for r in runs),
        median_p90_ms=statistics.median(r.wrk.p90_ms for r in runs),
        median_cellnode_cpu_us_per_request=statistics.median(r.cellnode_cpu_us_per_request for r in runs),
        median_cellnode_loop_cpu_us_per_request=statistics.median(r.cellnode_loop_cpu_us_per_request for r in runs),
        median_container_cpu_us_per_request=statistics.median(r.container_cpu_us_per_request for r in runs),
        median_engine_cpu_us_per_request=statistics.median(r.engine_cpu_us_per_request for r in runs),
        connections=[r.connections for r in runs],
        background=[r.background for r in runs],
    )


def ratios_to(base: System, other: System) -> dict[str, float]:
    a, b = other.summary, base.summary
    return {
        "throughput": a.median_requests_per_s / b.median_requests_per_s,
        "p50_latency": a.median_p50_ms / b.median_p50_ms,
        "p75_latency": other.median_p75_ms / base.median_p75_ms,
        "p90_latency": other.median_p90_ms / base.median_p90_ms,
        "p99_latency": a.median_p99_ms / b.median_p99_ms,
        "cpu_per_request": a.median_cpu_us_per_request / b.median_cpu_us_per_request,
    }


def reuse_verdict(systems: dict[str, System], connections: int) -> dict[str, Any]:
    """Whether the pass-through reused its connections: their number stays bounded by the concurrency (wrk's
    connections, plus the health check's one), not by the number of requests. A few may close during a run and be
    replaced: the service closes a pool connection left idle for its keep-alive (uvicorn's 5 s)."""
    bound = connections + 1
    through = [c for name, s in systems.items() if name != "direct" for c in s.connections]
    most = max((c.distinct for c in through), default=0)
    return {
        "method": (
            f"psutil net_connections of the cellnode server process every {SAMPLE_S:g} s during each measured run, "
            "plus connections to the container's port that entered TIME_WAIT during the run (/proc/net/tcp)"
        ),
        "bound": bound,
        "most_distinct_in_a_run": most,
        "closed_during_runs": sum(c.closed for c in through),
        "closed_by_cellnode": sum(c.closed_by_cellnode for c in through),
        "requests_in_those_runs": sum(c.requests for c in through),
        "fewest_requests_per_connection": min((c.requests / max(c.distinct, 1) for c in through), default=0),
        "reused": most <= 2 * bound,
    }


def report(
    systems: dict[str, System], dep: Deployment, info: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    base = systems["direct"]
    ratios = {name: ratios_to(base, s) for name, s in systems.items() if name != "direct"}
    print(
        f"\nPOST /predict: through cellnode vs direct to the container — {args.connections} connections, "
        f"{args.duration:g} s x {args.rounds} rounds (warm-up {args.warmup:g} s), "
        f"wrk {min(args.threads, args.connections)} threads"
    )
    print(
        f"machine: nproc {info['nproc']} ({info['cpu_model']}), Python {info['python']}, load at start "
        f"{info['load']}; service: Python {dep.service.get('python')}, fastapi {dep.service.get('fastapi')}, "
        f"uvicorn {dep.service.get('uvicorn')} (httptools {dep.service.get('httptools')}, "
        f"uvloop {dep.service.get('uvloop')})"
    )
    header = (
        f"{'system':<9} {'req/s':>6} {'p50 ms':>7} {'p75 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'(cellnode + container)':>22} {'engine':>6} {'conns':>5}  rounds req/s"
    )
    print(header)
    print("-" * len(header))
    for name, s in systems.items():
        m = s.summary
        rounds = ", ".join(f"{x:.0f}" for x in m.rounds_requests_per_s)
        split = f"({s.median_cellnode_cpu_us_per_request:.0f} + {s.median_container_cpu_us_per_request:.0f})"
        conns = max(c.distinct for c in s.connections)
        print(
            f"{name:<9} {m.median_requests_per_s:>6.0f} {m.median_p50_ms:>7.2f} {s.median_p75_ms:>7.2f} "
            f"{s.median_p90_ms:>7.2f} {m.median_p99_ms:>7.2f} {m.median_cpu_us_per_request:>10.0f} {split:>22} "
            f"{s.median_engine_cpu_us_per_request:>6.0f} {conns:>5}  {rounds}"
        )
    for name, r in ratios.items():
        print(
            f"{name}/direct: throughput {r['throughput']:.2f}x, latency p50 {r['p50_latency']:.2f}x, "
            f"p75 {r['p75_latency']:.2f}x, p90 {r['p90_latency']:.2f}x, p99 {r['p99_latency']:.2f}x, "
            f"CPU per request {r['cpu_per_request']:.2f}x (medians)"
        )
    reuse = reuse_verdict(systems, args.connections)
    for name, s in systems.items():
        if name == "direct":
            continue
        per_run = "; ".join(
            f"{c.distinct} for {c.requests} requests (at most {c.most_open} open, {c.closed} closed, "
            f"{c.closed_by_cellnode} of them by cellnode)"
            for c in s.connections
        )
        print(f"connections from cellnode to the container, {name} runs: {per_run}")
    direct_conns = sorted({c.distinct for c in base.connections})
    print(
        f"  during the direct runs, cellnode held {direct_conns} connection(s) to it: the health check's, and the "
        "pool's from the run before until the service closes them (idle 5 s)"
    )
    verdict = "reused" if reuse["reused"] else "!!! NOT reused"
    print(
        f"  {verdict}: at most {reuse['most_distinct_in_a_run']} connections in a run (concurrency bound "
        f"{reuse['bound']}), {reuse['closed_during_runs']} closed in all runs, at least "
        f"{reuse['fewest_requests_per_connection']:.0f} requests per connection"
    )
    busy_rounds({name: [b.others_cores for b in s.background] for name, s in systems.items()})
    errors = {name: s.summary.errors for name, s in systems.items() if s.summary.errors}
    if errors:
        print(f"\n!!! ERRORS during measurement: {errors}; these figures are not valid !!!", file=sys.stderr)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            **wrk_settings(args),
            "body": BODY,
            "healthcheck": HEALTHCHECK,
            "max_queue": dep.max_queue,
        },
        "machine": info,
        "service": dep.service,
        "cpu_fields": (
            "summary.*cpu*: cellnode's process tree + the container (its cgroup); summary.*child*: the container's "
            "part; engine (dockerd, containerd, the container's shim) is shown apart and not in the total"
        ),
        "systems": {name: asdict(s) for name, s in systems.items()},
        "ratios_over_direct": ratios,
        "connection_reuse": reuse,
        "errors": errors,
    }


# -- profile


def profile(wrk: str, target: Target, dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    """One more wrk run through cellnode (not counted in the figures) with py-spy sampling the server process: the
    collapsed stacks go to bench/results/, and the frames where most samples fall are printed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = RESULTS.with_name(f"passthrough_vs_direct.profile-{args.connections}.txt")
    argv = [spy, "record", "--pid", str(dep.cellnode_pid), "--duration", str(args.duration), "--rate", "200"]
    argv += ["--format", "raw", "--nolineno", "--threads", "--nonblocking", "--output", str(out)]
    print(f"\nProfiling cellnode with py-spy during one more {args.duration} s run of {target.name} ...")
    spying = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # py-spy attaches
        run_wrk(wrk, target, duration=args.duration, connections=args.connections, threads=args.threads)
        _, err = spying.communicate(timeout=args.duration + 30)
    finally:
        if spying.poll() is None:
            spying.kill()
            spying.wait()
    if spying.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spying.returncode}): {err}")
    summary = summarize_stacks(out.read_text())
    print(f"py-spy: {summary['samples']} samples ({out.relative_to(ROOT)}); by thread: {summary['threads']}")
    print("  most samples in (self):")
    for frame, share in summary["self"]:
        print(f"    {100 * share:5.1f} %  {frame}")
    print("  most samples under (inclusive, share of the event loop thread's samples):")
    for frame, share in summary["inclusive_main"]:
        print(f"    {100 * share:5.1f} %  {frame}")
    return summary


def summarize_stacks(text: str, top: int = 25) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks, `thread;frame;frame... count` per line: the share of samples per thread, per
    innermost frame, and per frame anywhere in the busiest thread's stacks (the event loop's)."""
    stacks: list[tuple[str, list[str], int]] = []
    for line in text.splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            thread, *frames = stack.split(";")
            stacks.append((thread, frames, int(number)))
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for thread, frames, count in stacks:
        threads[thread] += count
        own[frames[-1] if frames else thread] += count
    total = sum(threads.values()) or 1
    main = threads.most_common(1)[0][0] if threads else ""
    inclusive: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if thread == main:
            for frame in set(frames):
                inclusive[frame] += count
    # Leave out the frames every stack of the loop has (the entry point down to the event loop's run).
    root = max(inclusive.values(), default=0)
    below = Counter({frame: n for frame, n in inclusive.items() if n < 0.99 * root})
    return {
        "samples": sum(threads.values()),
        "threads": {name: round(n / total, 3) for name, n in threads.most_common(6)},
        "self": [(frame, round(n / total, 3)) for frame, n in own.most_common(top)],
        "inclusive_main": [(frame, round(n / (threads[main] or 1), 3)) for frame, n in below.most_common(top)],
    }


# -- main


def parse_args() -> argparse.Namespace:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--no-alias", dest="alias", action="store_false", help="leave out the alias variant (x-node-alias)"
        )
        parser.add_argument(
            "--profile", action="store_true", help="then profile cellnode with py-spy during one more run"
        )
        parser.add_argument(
            "--max-queue", type=int, default=None, help="the node's max_queue (default: cellnode's, 64)"
        )

    return parse_wrk_args(__doc__, duration=10, per="system", extra=extra)


def main() -> int:
    args = parse_args()
    wrk = ensure_wrk()
    load = [round(x, 2) for x in os.getloadavg()]  # before we add any: how busy the machine was at the start

    def body(servers: list[Server], tmp: Path) -> int:
        cache = pick_cache()
        print(f"Starting a private dockerd (image cache {cache}) ...")
        ensure_packages()
        engine = start_engine(tmp / "dockerd")
        dep: Deployment | None = None
        try:
            print("Building the example's image, starting cellnode serve, deploying the node ...")
            dep = deploy(engine, tmp, servers, args.alias, args.max_queue)
            print(
                f"Node {dep.node_id}: instance {dep.instance_id}, container PID {dep.container_pid}, listening on "
                f"127.0.0.1:{dep.container_port}; CPU from {ContainerCpu(dep.container_pid).source}"
            )
            print("Checking each system answers the call:")
            try:
                for target in dep.targets.values():
                    verify(dep, target)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\ncellnode's log (end):\n{servers[0].output()[-4000:]}") from None
            names = list(dep.targets)
            runs: dict[str, list[Run]] = {name: [] for name in names}
            for round_number in range(1, args.rounds + 1):
                shift = (round_number - 1) % len(names)  # each round starts with the next system
                for name in names[shift:] + names[:shift]:
                    for server in servers:
                        server.check_running()
                    run = measure_run(wrk, dep.targets[name], dep, engine, args)
                    runs[name].append(run)
                    print(f"  round {round_number}/{args.rounds} {name:<8}: {describe(run)}")
            systems = {name: system_of(runs[name]) for name in names}
            info = {
                **machine(),
                "load": load,
                "versions_proxy": {name: version(name) for name in ("httpx", "httpcore", "h11", "httptools", "uvloop")},
                "container_cpu_source": ContainerCpu(dep.container_pid).source,
                "engine_cache": str(cache_root()),
                "docker": engine.client.version().get("Version", "?"),
                "commit": git("rev-parse", "--short", "HEAD"),
                "uncommitted_changes_in_cellnode": bool(git("status", "--porcelain", "--", "cellnode")),
            }
            entry = {**report(systems, dep, info, args), "node_id": dep.node_id}
            if args.profile:
                entry["profile"] = profile(wrk, dep.targets["cellnode"], dep, args)
            save(entry, RESULTS)
            return 1 if entry["errors"] else 0
        finally:
            if dep is not None and servers and servers[0].proc.poll() is None:
                with suppress(Exception), Client(dep.url, dep.admin_key) as client:
                    if dep.routing_name:
                        client.delete_alias(dep.routing_name)
                    client.delete_node(dep.node_id)  # removes its container
            for server in reversed(servers):
                server.stop()
            servers.clear()
            with suppress(Exception):
                engine.client.images.remove(IMAGE)
            engine.stop()

    return run_bench(body)


if __name__ == "__main__":
    sys.exit(main())
