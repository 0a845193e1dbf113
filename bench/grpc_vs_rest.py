"""The randomizer node over gRPC against the same node over REST: one `cellnode serve`, one load generator.

Run by hand, not by CI (it installs Debian's `nghttp2-client`, for `h2load`, and `wrk` if they are missing, and takes
about rounds x 4 x (duration + warm-up + 1) seconds plus ~15 s of set-up: about 2 min 45 s with the defaults):

    .venv/bin/python bench/grpc_vs_rest.py [--duration 10] [--rounds 3] [--concurrency 16] [--streams 4]

It starts a real `cellnode serve --port 0 --grpc-port 0` with the randomizer node deployed from
examples/randomizer.ipynb, checks the documented call over both protocols (grpcio for gRPC), then drives
`NodeService/Execute` and `POST /datasphere/v1/nodes/{id}:execute` with `h2load` in alternating rounds on 127.0.0.1:
gRPC with each request on a connection of its own (C x 1) and with C / S connections of S streams, REST over
HTTP/1.1 with C connections, and REST with `wrk` (as the older benchmarks measured it). After each measured run it
reads the server's /metrics to check that every gRPC answer h2load counted was an OK, since h2load does not read
gRPC trailers. It prints a table and the gRPC/REST ratios and writes bench/results/grpc_vs_rest.json (one entry per
concurrency). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import httpx
from alias_routing import busy_rounds, machine_cpu_seconds, waited_children_cpu_seconds
from execute_vs_fastapi import (
    INPUT,
    NOTEBOOK,
    ROOT,
    START_TIMEOUT,
    URL_LINE,
    Server,
    Target,
    _cpu_model,
    clean_env,
    ensure_wrk,
    parse_wrk,
    run_bench,
    run_wrk,
    to_ms,
    tree_cpu_seconds,
    verify,
)

from cellnode import Client
from cellnode.grpc import protos

RESULTS = ROOT / "bench" / "results" / "grpc_vs_rest.json"
GRPC_LINE = re.compile(r"gRPC on 127\.0\.0\.1:(\d+)")
TARGET_RATIO = 1.5  # gRPC throughput over REST's, from the issue
SETTLE_S = 0.5  # for the requests a load generator left in flight to finish (or be cancelled) before /metrics is read
CODE_SERIES = {"node_grpc_codes_total": "grpc", "node_http_codes_total": "http"}
LABEL = re.compile(r'(\w+)="([^"]*)"')
H2LOAD_TIMES = re.compile(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)
H2LOAD_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
H2LOAD_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
H2LOAD_FINISHED = re.compile(r"^finished in ([\d.]+)s, ([\d.]+) req/s", re.M)
WRK_LATENCY = re.compile(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


@dataclass
class Deployment:
    url: str
    grpc_port: int
    admin_key: str
    node_id: str
    folder_id: str
    token: str
    pid: int
    grpc_body: Path  # one gRPC message as it goes on the wire: 0 (not compressed), 4-byte length, the message
    rest_body: Path


@dataclass(frozen=True)
class Variant:
    """One way of calling the node: the protocol, the load generator, and how the concurrency is spread."""

    name: str
    protocol: str  # "grpc" or "rest"
    tool: str  # "h2load" or "wrk"
    connections: int
    streams: int  # concurrent requests per connection (HTTP/2 streams); 1 for REST


@dataclass
class Run:
    requests_per_s: float
    requests: int  # completed within the measured window
    started: int  # sent, some left in flight at the end (h2load counts them; for wrk: requests + connections)
    ok: int  # 2xx answers the load generator counted
    failed: int  # non-2xx answers, failed, errored and timed-out requests, socket errors
    mean_ms: float
    sd_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us_per_request: float  # the server's process tree: the front and the instance
    instance_cpu_us_per_request: float
    front_threads_us_per_request: dict[str, float]  # the front's CPU by thread: loop, grpc-core, other
    front_switches_per_request: float  # context switches of the front's threads
    client_cpu_us_per_request: float  # h2load or wrk
    others_cores: float  # machine-wide CPU used by what the benchmark did not start, in cores
    steal_cores: float
    codes: dict[str, int]  # how the server's node_{grpc,http}_codes_total grew during the run ("grpc OK": N)
    problems: list[str] = field(default_factory=list)


@dataclass
class Summary:
    variant: Variant
    median_requests_per_s: float
    median_mean_ms: float
    median_sd_ms: float
    median_p50_ms: float
    median_p90_ms: float
    median_p99_ms: float
    median_max_ms: float
    median_cpu_us_per_request: float
    median_instance_cpu_us_per_request: float
    median_front_threads_us_per_request: dict[str, float]
    median_front_switches_per_request: float
    median_client_cpu_us_per_request: float
    rounds_requests_per_s: list[float]
    problems: int
    runs: list[Run]


# -- set-up and checks


def deploy(tmp: Path, servers: list[Server]) -> Deployment:
    """`cellnode serve --port 0 --grpc-port 0` on a temp data dir, with the randomizer node and an IAM token."""
    data_dir = tmp / "data"
    # TMPDIR: the local backend's runtime directory (sockets, launch specs) goes under ours, removed at the end.
    env = clean_env(CELLNODE_PROFILE=str(tmp / "profile.json"), CELLNODE_LOG_LEVEL="warning", TMPDIR=str(tmp))
    argv = [sys.executable, "-m", "cellnode", "serve", "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir)]
    server = Server("cellnode serve", argv, env, tmp / "cellnode.log")
    servers.append(server)
    deadline = time.monotonic() + START_TIMEOUT
    url, grpc_port = "", 0
    while not (url and grpc_port):
        server.check_running()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"cellnode serve printed no URL and gRPC port in {START_TIMEOUT:g} s:\n{server.output()}"
            )
        output = server.output()
        url_match, grpc_match = URL_LINE.search(output), GRPC_LINE.search(output)
        url = url_match.group(1) if url_match else ""
        grpc_port = int(grpc_match.group(1)) if grpc_match else 0
        time.sleep(0.05)
    server.wait_healthy(url, "/health")
    admin_key = (data_dir / "admin.key").read_text().strip()
    with Client(url, admin_key) as client:
        client.create_checkpoint(NOTEBOOK, name="randomizer-checkpoint")
        node = client.create_node(
            "randomizer-node",
            checkpoint="randomizer-checkpoint",
            inputs={"input_data": "dict"},
            outputs={"output_data": "dict"},
        )
        token: str = client.create_token()["iam_token"]
    request = protos.NodeExecutionRequest(folder_id=node["folder_id"], node_id=node["id"])
    request.input.update(INPUT)
    message: bytes = request.SerializeToString()
    grpc_body, rest_body = tmp / "grpc-request.bin", tmp / "rest-request.json"
    grpc_body.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    rest_body.write_text(json.dumps({"folder_id": node["folder_id"], "input": INPUT}))
    return Deployment(
        url, grpc_port, admin_key, node["id"], node["folder_id"], token, server.proc.pid, grpc_body, rest_body
    )


def rest_target(dep: Deployment) -> Target:
    url = f"{dep.url}/datasphere/v1/nodes/{dep.node_id}:execute"
    return Target("REST", url, dep.rest_body.read_text(), dep.token, dep.pid)


def verify_grpc(dep: Deployment, calls: int = 50) -> None:
    """The documented call over grpcio answers `output {output_data {generated_value: N}}`, 1 <= N <= 10 a whole
    number, from the exact message the h2load body holds; a wrong token gets UNAUTHENTICATED."""
    message = dep.grpc_body.read_bytes()[5:]
    seen = set()
    with grpc.insecure_channel(f"127.0.0.1:{dep.grpc_port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        execute: grpc.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            protos.EXECUTE, response_deserializer=protos.NodeExecutionResponse.FromString
        )
        for _ in range(calls):
            response = execute(message, metadata=(("authorization", f"Bearer {dep.token}"),), timeout=10)
            output = response.output
            if set(output.fields) != {"output_data"}:
                raise RuntimeError(f"gRPC answered an unexpected shape: {response}")
            data = output.fields["output_data"]
            if data.WhichOneof("kind") != "struct_value" or set(data.struct_value.fields) != {"generated_value"}:
                raise RuntimeError(f"gRPC answered an unexpected shape: {response}")
            value = data.struct_value.fields["generated_value"]
            number = value.number_value
            if value.WhichOneof("kind") != "number_value" or not number.is_integer() or not 1 <= number <= 10:
                raise RuntimeError(f"gRPC answered generated_value={value}, not a whole number in [1, 10]")
            seen.add(int(number))
        try:
            execute(message, metadata=(("authorization", "Bearer wrong"),), timeout=10)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code != grpc.StatusCode.UNAUTHENTICATED:
                raise RuntimeError(f"gRPC answered {code} to a wrong token, not UNAUTHENTICATED") from None
        else:
            raise RuntimeError("gRPC answered a call with a wrong token")
    if len(seen) < 2:
        raise RuntimeError(f"gRPC answered {calls} calls with the same value {seen}; is it random?")
    print(f"  gRPC: {calls} calls answered correctly (values seen: {sorted(seen)}); a wrong token gets UNAUTHENTICATED")


def read_codes(dep: Deployment) -> dict[str, int]:
    """The node's execute answers so far, by protocol and code ("grpc OK", "http 200"), from /metrics."""
    response = httpx.get(
        f"{dep.url}/metrics", headers={"Authorization": f"Api-Key {dep.admin_key}"}, timeout=10, trust_env=False
    )
    response.raise_for_status()
    codes: dict[str, int] = {}
    for line in response.text.splitlines():
        name, _, rest = line.partition("{")
        if name not in CODE_SERIES:
            continue
        labels_text, _, value = rest.rpartition("}")
        labels = dict(LABEL.findall(labels_text))
        if labels.get("node_id") == dep.node_id:
            key = f"{CODE_SERIES[name]} {labels['code']}"
            codes[key] = codes.get(key, 0) + int(float(value))
    return codes


def check_codes(variant: Variant, run: Run) -> list[str]:
    """What is wrong with a run going by the server's own count of its answers; empty if nothing.

    Every answer the load generator counted as 2xx must be an OK (gRPC) or a 200 (REST) in the server's count; a
    few more may be, for the requests left in flight when the run stopped. Those may also end CANCELLED on gRPC,
    when the client closes the connection before the answer is written. No other code may appear.
    """
    good = "grpc OK" if variant.protocol == "grpc" else "http 200"
    in_flight = run.started - run.requests
    problems = []
    if run.codes.get(good, 0) < run.ok:
        problems.append(f"the server counted {run.codes.get(good, 0)} {good} answers, fewer than the {run.ok} 2xx")
    for code, count in run.codes.items():
        if code == good or count == 0:
            continue
        if code == "grpc CANCELLED" and variant.protocol == "grpc" and count <= in_flight:
            continue
        problems.append(f"the server counted {count} {code} answers")
    if run.codes.get(good, 0) + run.codes.get("grpc CANCELLED", 0) > run.started:
        problems.append(f"the server counted more answers ({run.codes}) than the {run.started} requests started")
    return problems


# -- measurement


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process's threads: the event loop (the main thread), gRPC's C-core threads
    (`event_engine`), and the others (mostly grpc.aio's poller thread, a Python thread)."""
    totals = {"loop": 0.0, "grpc-core": 0.0, "other": 0.0}
    ticks = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        fields = stat.rpartition(")")[2].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        kind = "loop" if tid == str(pid) else "grpc-core" if comm.startswith(("event_engine", "grpc")) else "other"
        totals[kind] += seconds
    return totals


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of a process's threads so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # the thread ended
        total += sum(int(n) for n in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M))
    return total


def h2load_argv(h2load: str, dep: Deployment, variant: Variant, duration: int, threads: int) -> list[str]:
    argv = [
        h2load,
        f"--clients={variant.connections}",
        f"--threads={min(threads, variant.connections)}",
        f"--duration={duration}",
        f"--header=authorization: Bearer {dep.token}",
    ]
    if variant.protocol == "grpc":
        url = f"http://127.0.0.1:{dep.grpc_port}{protos.EXECUTE}"
        argv += [
            f"--max-concurrent-streams={variant.streams}",
            f"--data={dep.grpc_body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
        ]
    else:
        url = f"{dep.url}/datasphere/v1/nodes/{dep.node_id}:execute"
        argv += ["--h1", f"--data={dep.rest_body}", "--header=content-type: application/json"]
    return [*argv, url]


def run_h2load(argv: list[str], duration: int) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"h2load failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def parse_h2load(output: str, log: Path) -> dict[str, Any]:
    """h2load's counts, req/s and latency summary; the percentiles from its per-request log (microseconds)."""
    finished, requests = H2LOAD_FINISHED.search(output), H2LOAD_REQUESTS.search(output)
    status, times = H2LOAD_STATUS.search(output), H2LOAD_TIMES.search(output)
    if finished is None or requests is None or status is None or times is None:
        raise ValueError(f"Cannot read the h2load output:\n{output}")
    total, started, done, _, failed, errored, timeout = map(int, requests.groups())
    ok, *others = map(int, status.groups())
    durations, not_ok = [], 0
    for line in log.read_text().splitlines():
        _, code, micros = line.split("\t")[:3]
        durations.append(int(micros) / 1000)
        not_ok += code != "200"
    if len(durations) != done:
        raise ValueError(f"h2load logged {len(durations)} requests but counted {done} done:\n{output}")
    durations.sort()
    _, max_ms, mean_ms, sd_ms = map(to_ms, times.groups())
    return {
        "requests_per_s": float(finished.group(2)),
        "requests": done,
        "started": started,
        "ok": ok,
        "failed": sum(others) + failed + errored + timeout + not_ok + (total - done),
        "mean_ms": mean_ms,
        "sd_ms": sd_ms,
        "max_ms": max_ms,
        "p50_ms": percentile(durations, 0.50),
        "p90_ms": percentile(durations, 0.90),
        "p99_ms": percentile(durations, 0.99),
    }


def run_once(
    tools: dict[str, str], dep: Deployment, variant: Variant, args: argparse.Namespace, log: Path, duration: int
) -> tuple[dict[str, Any], float, float]:
    """One run of the variant's load generator: what it measured, and the CPU seconds of the server and of its
    children (the instance) meanwhile. h2load writes its per-request log to `log`."""
    if variant.tool == "wrk":
        output, server_cpu, child_cpu = run_wrk(
            tools["wrk"], rest_target(dep), duration=duration, connections=variant.connections, threads=args.threads
        )
        parsed = parse_wrk(output)
        latency = WRK_LATENCY.search(output)
        if latency is None:
            raise ValueError(f"Cannot read the wrk output:\n{output}")
        mean_ms, sd_ms, max_ms = map(to_ms, latency.groups())
        measured = {
            "requests_per_s": parsed["requests_per_s"],
            "requests": parsed["requests"],
            "started": parsed["requests"] + variant.connections,
            "ok": parsed["requests"] - parsed["non_2xx"],
            "failed": parsed["non_2xx"] + sum(parsed["socket_errors"].values()),
            "mean_ms": mean_ms,
            "sd_ms": sd_ms,
            "max_ms": max_ms,
            "p50_ms": parsed["p50_ms"],
            "p90_ms": parsed["p90_ms"],
            "p99_ms": parsed["p99_ms"],
        }
        return measured, server_cpu, child_cpu
    log.unlink(missing_ok=True)  # h2load appends to its log
    argv = [*h2load_argv(tools["h2load"], dep, variant, duration, args.threads), f"--log-file={log}"]
    server_before, children_before = tree_cpu_seconds(dep.pid)
    output = run_h2load(argv, duration)
    server_after, children_after = tree_cpu_seconds(dep.pid)
    return parse_h2load(output, log), server_after - server_before, children_after - children_before


def measure(tools: dict[str, str], dep: Deployment, variant: Variant, args: argparse.Namespace, tmp: Path) -> Run:
    """A discarded warm-up, then the measured run, with the CPU of the server, its threads, the client and the rest
    of the machine, and the server's count of its answers."""
    log = tmp / "h2load.log"
    if args.warmup > 0:
        run_once(tools, dep, variant, args, tmp / "h2load-warmup.log", args.warmup)
    time.sleep(SETTLE_S)
    codes_before = read_codes(dep)
    busy, steal = machine_cpu_seconds()
    client_cpu, threads, switches = (
        waited_children_cpu_seconds(),
        thread_cpu_seconds(dep.pid),
        context_switches(dep.pid),
    )
    started = time.monotonic()
    measured, server_cpu, child_cpu = run_once(tools, dep, variant, args, log, args.duration)
    elapsed = time.monotonic() - started
    busy_after, steal_after = machine_cpu_seconds()
    client_cpu = waited_children_cpu_seconds() - client_cpu
    threads_after, switches = thread_cpu_seconds(dep.pid), context_switches(dep.pid) - switches
    time.sleep(SETTLE_S)
    codes_after = read_codes(dep)
    per_request = 1e6 / measured["requests"] if measured["requests"] else 0.0
    run = Run(
        **measured,
        cpu_us_per_request=(server_cpu + child_cpu) * per_request,
        instance_cpu_us_per_request=child_cpu * per_request,
        front_threads_us_per_request={k: (threads_after[k] - threads[k]) * per_request for k in threads},
        front_switches_per_request=switches * per_request / 1e6,
        client_cpu_us_per_request=client_cpu * per_request,
        others_cores=round((busy_after - busy - server_cpu - child_cpu - client_cpu) / elapsed, 3),
        steal_cores=round((steal_after - steal) / elapsed, 3),
        codes={k: codes_after.get(k, 0) - codes_before.get(k, 0) for k in codes_after},
    )
    if run.failed:
        run.problems.append(f"{run.failed} requests failed or were not answered 2xx")
    run.problems += check_codes(variant, run)
    for problem in run.problems:
        print(f"\n!!! {variant.name}: {problem}; the run's figures are not valid !!!", file=sys.stderr)
    return run


def summarize(variant: Variant, runs: list[Run]) -> Summary:
    def median(key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs))

    return Summary(
        variant=variant,
        median_requests_per_s=median("requests_per_s"),
        median_mean_ms=median("mean_ms"),
        median_sd_ms=median("sd_ms"),
        median_p50_ms=median("p50_ms"),
        median_p90_ms=median("p90_ms"),
        median_p99_ms=median("p99_ms"),
        median_max_ms=median("max_ms"),
        median_cpu_us_per_request=median("cpu_us_per_request"),
        median_instance_cpu_us_per_request=median("instance_cpu_us_per_request"),
        median_front_threads_us_per_request={
            k: statistics.median(r.front_threads_us_per_request[k] for r in runs)
            for k in runs[0].front_threads_us_per_request
        },
        median_front_switches_per_request=median("front_switches_per_request"),
        median_client_cpu_us_per_request=median("client_cpu_us_per_request"),
        rounds_requests_per_s=[r.requests_per_s for r in runs],
        problems=sum(len(r.problems) for r in runs),
        runs=runs,
    )


# -- report


def machine(tools: dict[str, str]) -> dict[str, Any]:
    h2load = subprocess.run([tools["h2load"], "--version"], capture_output=True, text=True).stdout.strip()
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "h2load": h2load,
        "versions": {name: version(name) for name in ("cellnode", "grpcio", "protobuf", "uvicorn")},
        "load": [round(x, 2) for x in os.getloadavg()],
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes_in_cellnode": bool(git("status", "--porcelain", "--", "cellnode")),
    }
    if "wrk" in tools:
        wrk = subprocess.run([tools["wrk"], "--version"], capture_output=True, text=True).stdout.splitlines()
        info["wrk"] = wrk[0].strip() if wrk else "?"
    return info


def git(*argv: str) -> str:
    result = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=ROOT)
    return result.stdout.strip() if result.returncode == 0 else "?"


def ratios_to(base: Summary, other: Summary) -> dict[str, float]:
    return {
        "throughput": other.median_requests_per_s / base.median_requests_per_s,
        "mean_latency": other.median_mean_ms / base.median_mean_ms,
        "p50_latency": other.median_p50_ms / base.median_p50_ms,
        "p99_latency": other.median_p99_ms / base.median_p99_ms,
        "cpu_per_request": other.median_cpu_us_per_request / base.median_cpu_us_per_request,
        "front_cpu_per_request": (other.median_cpu_us_per_request - other.median_instance_cpu_us_per_request)
        / (base.median_cpu_us_per_request - base.median_instance_cpu_us_per_request),
    }


def report(summaries: dict[str, Summary], info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    base = summaries[rest_name(args)]
    print(
        f"\nexecute over gRPC vs REST — {args.concurrency} concurrent requests, {args.duration:g} s x {args.rounds} "
        f"rounds (warm-up {args.warmup:g} s), load generators with {args.threads} threads"
    )
    print(
        f"machine: nproc {info['nproc']} ({info['cpu_model']}), Python {info['python']}, "
        f"grpcio {info['versions']['grpcio']}, {info['h2load']}, load {info['load']}"
    )
    header = (
        f"{'variant':<18} {'req/s':>6} {'mean':>6} {'sd':>5} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6} "
        f"{'CPU us/req':>10} {'loop':>5} {'core':>5} {'othr':>5} {'inst':>5} {'client':>6} {'cs/req':>6}  "
        "rounds req/s"
    )
    print(header)
    print("-" * len(header))
    for name, s in summaries.items():
        threads = s.median_front_threads_us_per_request
        rounds = ", ".join(f"{x:.0f}" for x in s.rounds_requests_per_s)
        print(
            f"{name:<18} {s.median_requests_per_s:>6.0f} {s.median_mean_ms:>6.2f} "
            f"{s.median_sd_ms:>5.2f} {s.median_p50_ms:>6.2f} {s.median_p90_ms:>6.2f} "
            f"{s.median_p99_ms:>6.2f} {s.median_max_ms:>6.1f} {s.median_cpu_us_per_request:>10.0f} "
            f"{threads['loop']:>5.0f} {threads['grpc-core']:>5.0f} {threads['other']:>5.0f} "
            f"{s.median_instance_cpu_us_per_request:>5.0f} {s.median_client_cpu_us_per_request:>6.0f} "
            f"{s.median_front_switches_per_request:>6.1f}  {rounds}"
        )
    print(
        "(latencies in ms; CPU in us per request: the server's whole tree, then the front's event-loop thread, "
        "gRPC C-core threads, other threads (grpc.aio's poller), the instance, and the load generator; cs/req: "
        "context switches of the front's threads per request)"
    )
    ratios = {name: ratios_to(base, s) for name, s in summaries.items() if s is not base}
    for name, r in ratios.items():
        verdict = ""
        if summaries[name].variant.protocol == "grpc":
            verdict = f" ({'meets' if r['throughput'] >= TARGET_RATIO else 'BELOW'} the {TARGET_RATIO}x target)"
        print(
            f"{name} / {base.variant.name}: throughput {r['throughput']:.2f}x{verdict}, mean latency "
            f"{r['mean_latency']:.2f}x, p50 {r['p50_latency']:.2f}x, p99 {r['p99_latency']:.2f}x, CPU per request "
            f"{r['cpu_per_request']:.2f}x (front alone {r['front_cpu_per_request']:.2f}x)"
        )
    busy = busy_rounds({name: [run.others_cores for run in s.runs] for name, s in summaries.items()})
    problems = {name: s.problems for name, s in summaries.items() if s.problems}
    if problems:
        print(f"\n!!! PROBLEMS during measurement: {problems}; these figures are not valid !!!", file=sys.stderr)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "streams": args.streams,
            "threads": args.threads,
            "warmup_s": args.warmup,
        },
        "machine": info,
        "variants": {name: asdict(s) for name, s in summaries.items()},
        "ratios_to_rest_h2load": ratios,
        "busy_rounds": busy,
        "problems": problems,
    }


def save(entry: dict[str, Any]) -> None:
    """Keep one entry per concurrency in the results file, so runs at 16 and 64 sit side by side."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing: dict[str, Any] = {}
    try:
        existing = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        pass
    by_concurrency = existing.get("by_concurrency")
    if not isinstance(by_concurrency, dict):
        by_concurrency = {}
    by_concurrency[str(entry["settings"]["concurrency"])] = entry
    RESULTS.write_text(json.dumps({"by_concurrency": by_concurrency}, indent=2) + "\n")
    print(f"\nResults written to {RESULTS.relative_to(ROOT)}")


# -- main


def rest_name(args: argparse.Namespace) -> str:
    return f"REST h2load {args.concurrency}"


def variants(args: argparse.Namespace) -> list[Variant]:
    c, s = args.concurrency, args.streams
    chosen = [Variant(f"gRPC h2load {c}x1", "grpc", "h2load", c, 1)]
    if s > 1:
        chosen.append(Variant(f"gRPC h2load {c // s}x{s}", "grpc", "h2load", c // s, s))
    chosen.append(Variant(rest_name(args), "rest", "h2load", c, 1))
    if args.wrk:
        chosen.append(Variant(f"REST wrk {c}", "rest", "wrk", c, 1))
    return chosen


def ensure_h2load() -> str:
    found = shutil.which("h2load")
    if found is None:
        print("h2load is not installed; installing Debian's nghttp2-client (apt-get update && apt-get install -y).")
        subprocess.run(["apt-get", "update"], check=True, timeout=600, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "nghttp2-client"], check=True, timeout=600, stdout=subprocess.DEVNULL
        )
        found = shutil.which("h2load")
        if found is None:
            raise RuntimeError("apt-get installed nghttp2-client but h2load is not on PATH.")
    return found


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each measured run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (default 16)")
    parser.add_argument(
        "--streams",
        type=int,
        default=4,
        help="streams per connection of the multiplexed gRPC variant; 1 leaves it out (default 4)",
    )
    parser.add_argument("--threads", type=int, default=2, help="load generator threads (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of discarded run before each (default 2)")
    parser.add_argument("--no-wrk", dest="wrk", action="store_false", help="leave out the REST run with wrk")
    args = parser.parse_args()
    for flag in ("duration", "rounds", "concurrency", "streams", "threads", "warmup"):
        least = 0 if flag == "warmup" else 1
        if getattr(args, flag) < least:
            parser.error(f"--{flag} is {getattr(args, flag)}; give {least} or more")
    if args.concurrency % args.streams:
        parser.error(f"--concurrency {args.concurrency} is not a multiple of --streams {args.streams}")
    return args


def main() -> int:
    args = parse_args()
    tools = {"h2load": ensure_h2load()}
    if args.wrk:
        tools["wrk"] = ensure_wrk()
    info = machine(tools)  # before we start anything: the load average says how busy the machine was
    chosen = variants(args)

    def body(servers: list[Server], tmp: Path) -> int:
        print("Starting cellnode serve --grpc-port 0 and deploying randomizer-node ...")
        dep = deploy(tmp, servers)
        print("Checking both protocols answer the documented call:")
        verify_grpc(dep)
        verify(rest_target(dep))
        runs: dict[str, list[Run]] = {v.name: [] for v in chosen}
        for round_number in range(1, args.rounds + 1):
            # Each round starts one variant later, so that no variant always runs first.
            shift = (round_number - 1) % len(chosen)
            for variant in chosen[shift:] + chosen[:shift]:
                for server in servers:
                    server.check_running()
                run = measure(tools, dep, variant, args, tmp)
                runs[variant.name].append(run)
                print(
                    f"  round {round_number}/{args.rounds} {variant.name:<18}: {run.requests_per_s:>6.0f} req/s, "
                    f"mean {run.mean_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, {run.cpu_us_per_request:.0f} CPU "
                    f"us/req (instance {run.instance_cpu_us_per_request:.0f}), client "
                    f"{run.client_cpu_us_per_request:.0f}; others used {run.others_cores:.2f} cores; "
                    f"server codes {run.codes}"
                )
        summaries = {v.name: summarize(v, runs[v.name]) for v in chosen}
        entry = report(summaries, info, args)
        save(entry)
        return 1 if entry["problems"] else 0

    return run_bench(body)


if __name__ == "__main__":
    sys.exit(main())
