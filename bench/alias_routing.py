"""What routing through an alias costs on the execute hot path, against calling the node directly.

Run by hand, not by CI (it installs Debian's `wrk` if it is missing, and takes about
rounds x 5 x (duration + warm-up) seconds plus ~10 s of set-up: about 2 minutes 10 s with the defaults):

    .venv/bin/python bench/alias_routing.py [--duration 6] [--rounds 3] [--connections 16]

It starts a real `cellnode serve --port 0` with two nodes deployed from examples/randomizer.ipynb (`randomizer-a`
and `randomizer-b`, one checkpoint, one instance each) and three aliases over them, checks that each variant answers
the documented call and routes as declared, then drives the five variants with `wrk` in alternating rounds on
127.0.0.1: the node itself, an alias with that node at 100 %, an alias 50/50 over both, that alias with a route key
on every request, and the 100 % alias with a 10 % mirror to the other node. It prints a table and writes
bench/results/alias_routing.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from execute_vs_fastapi import (
    INPUT,
    NOTEBOOK,
    ROOT,
    Server,
    Summary,
    Target,
    WrkRun,
    ensure_wrk,
    launch_cellnode,
    machine,
    measure,
    parse_wrk,
    parse_wrk_args,
    run_bench,
    run_wrk,
    summarize,
    verify,
    wrk_settings,
)

from cellnode import Client

LUA_SCRIPT = ROOT / "bench" / "wrk_alias.lua"
RESULTS = ROOT / "bench" / "results" / "alias_routing.json"
ALIASES = "/cellnode/v1/aliases"
ROUTE_KEY = "x-cellnode-route-key"
NODES = ("randomizer-a", "randomizer-b")
VARIANTS = ("node", "alias-1", "alias-2", "alias-sticky", "alias-mirror")
MIRROR_PERCENT = 10
ROUTE_KEYS = 1000  # distinct route keys per wrk thread in alias-sticky, each used in turn
SETTLE_S = 0.5  # for the last shadow copies of a run to be compared and counted
# Flag a run during which other processes used more than this many cores. The figure reads about -0.1 on a quiet
# machine: /proc/stat samples machine-wide time per tick, while a process's own time is counted more exactly.
BUSY_OTHERS = 0.15


@dataclass
class Deployment:
    url: str
    admin_key: str
    node_ids: dict[str, str]  # node name -> ID
    aliases: dict[str, str]  # alias name -> routing name
    targets: dict[str, Target]


@dataclass
class MirrorCount:
    """Shadow copies sent to the mirror node during one warm-up + measured run, and how they compared."""

    requests: int  # primary requests wrk completed, warm-up included
    copies: int
    agree: int
    differ: int
    error: int


@dataclass
class Background:
    """CPU used during a measured run by what the benchmark did not start, in cores (1.0: one core all along)."""

    others_cores: float  # machine-wide user + system time less the server's tree and wrk: other test runs, us
    steal_cores: float  # taken by the hypervisor


@dataclass
class Variant:
    summary: Summary
    median_front_cpu_us_per_request: float  # the server process alone: routing, auth, the hop; not the instances
    background: list[Background]
    mirror: list[MirrorCount] = field(default_factory=list)


# -- set-up and checks


def deploy(tmp: Path, servers: list[Server]) -> Deployment:
    server, url, key = launch_cellnode(tmp, servers)
    with Client(url, key) as client:
        client.create_checkpoint(NOTEBOOK, name="randomizer-checkpoint")
        nodes = {
            name: client.create_node(
                name,
                checkpoint="randomizer-checkpoint",
                inputs={"input_data": "dict"},
                outputs={"output_data": "dict"},
                instances=1,
            )
            for name in NODES
        }
        a, b = (nodes[name]["id"] for name in NODES)
        declared = {
            "bench-one": {"nodes": [{"node": a, "percent": 100}], "mirrors": []},
            "bench-split": {"nodes": [{"node": a, "percent": 50}, {"node": b, "percent": 50}], "mirrors": []},
            "bench-mirror": {
                "nodes": [{"node": a, "percent": 100}],
                "mirrors": [{"node": b, "percent": MIRROR_PERCENT}],
            },
        }
        aliases = {
            name: str(client._request("POST", ALIASES, json={"name": name, **body})["routing_name"])
            for name, body in declared.items()
        }
        token: str = client.create_token()["iam_token"]
    body = json.dumps({"folder_id": nodes[NODES[0]]["folder_id"], "input": INPUT})

    def target(variant: str, path: str, route_keys: int = 0) -> Target:
        env = {"BENCH_ROUTE_KEYS": str(route_keys)}
        return Target(variant, f"{url}{path}", body, token, server.proc.pid, script=LUA_SCRIPT, env=env)

    def alias_path(name: str) -> str:
        return f"/datasphere/v1/aliases/{aliases[name]}:execute"

    targets = {
        "node": target("node", f"/datasphere/v1/nodes/{a}:execute"),
        "alias-1": target("alias-1", alias_path("bench-one")),
        "alias-2": target("alias-2", alias_path("bench-split")),
        "alias-sticky": target("alias-sticky", alias_path("bench-split"), ROUTE_KEYS),
        "alias-mirror": target("alias-mirror", alias_path("bench-mirror")),
    }
    return Deployment(url, key, {name: nodes[name]["id"] for name in NODES}, aliases, targets)


def answered_by(target: Target, calls: int, key: str | None = None) -> Counter[str]:
    """How many of `calls` calls each node answered (the `x-node-id` header of an alias's answer)."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    if key is not None:
        headers[ROUTE_KEY] = key
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=10, trust_env=False) as http:
        for _ in range(calls):
            response = http.post(target.url, content=target.body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{target.name} answered {response.status_code}: {response.text}")
            seen[response.headers.get("x-node-id", "?")] += 1
    return seen


def mirror_totals(dep: Deployment) -> dict[str, int]:
    """What the mirror alias has counted of its shadow copies so far, on this server."""
    with Client(dep.url, dep.admin_key) as client:
        alias = client._request("GET", f"{ALIASES}/{quote(dep.aliases['bench-mirror'], safe='')}")
    stats = [s for s in alias.get("mirror_stats") or [] if s["node_id"] == dep.node_ids[NODES[1]]]
    keys = ("requests", "agree", "differ", "error")
    return {k: int(stats[0][k]) if stats else 0 for k in keys}


def check_routing(dep: Deployment) -> dict[str, Any]:
    """Each variant answers the documented call, and each alias sends its requests where it declares."""
    for target in dep.targets.values():
        verify(target)
    a, b = (dep.node_ids[name] for name in NODES)
    one = answered_by(dep.targets["alias-1"], 50)
    if one != {a: 50}:
        raise RuntimeError(f"alias-1 (100 % {a}) sent 50 calls to {dict(one)}")
    split = answered_by(dep.targets["alias-2"], 200)
    if set(split) != {a, b} or min(split.values()) < 50:
        raise RuntimeError(f"alias-2 (50/50 over {a} and {b}) sent 200 calls to {dict(split)}")
    sticky: Counter[str] = Counter()
    for index in range(20):
        by_key = answered_by(dep.targets["alias-sticky"], 5, key=f"check-{index}")
        if len(by_key) != 1:
            raise RuntimeError(f"alias-2 sent 5 calls with route key check-{index} to {dict(by_key)}, not one node")
        sticky.update(by_key.keys())
    if set(sticky) != {a, b}:
        raise RuntimeError(f"alias-2 sent 20 route keys all to {dict(sticky)}; expected both nodes")
    mirrored = answered_by(dep.targets["alias-mirror"], 100)
    if mirrored != {a: 100}:
        raise RuntimeError(f"alias-mirror (100 % {a}) sent 100 calls to {dict(mirrored)}")
    time.sleep(SETTLE_S)
    copies = mirror_totals(dep)["requests"]
    if not copies:
        raise RuntimeError(f"alias-mirror ({MIRROR_PERCENT} % mirror to {b}) copied none of 150 calls")
    print(
        f"  routing: alias-1 sent 50/50 calls to {NODES[0]}; alias-2 split 200 calls "
        f"{split[a]}/{split[b]}; 20 route keys each stayed on one node ({sticky[a]} on a, {sticky[b]} on b); "
        f"alias-mirror copied {copies} of 150 calls to {NODES[1]}"
    )
    return {
        "alias_1_calls": dict(one),
        "alias_2_calls": dict(split),
        "sticky_keys_per_node": dict(sticky),
        "mirror_copies_of_150": copies,
    }


# -- measurement and report


def busy_rounds(cores: dict[str, list[float]]) -> list[str]:
    """The rounds (per system, the other processes' cores in each) disturbed by more than BUSY_OTHERS cores of other
    work; printed, and returned for the results."""
    busy = [
        f"{name} round {index + 1} ({value:.2f} cores)"
        for name, values in cores.items()
        for index, value in enumerate(values)
        if value > BUSY_OTHERS
    ]
    if busy:
        print(f"Other processes used more than {BUSY_OTHERS} cores during: {', '.join(busy)}; consider a rerun")
    return busy


def machine_cpu_seconds() -> tuple[float, float]:
    """Machine-wide CPU seconds in user, nice and system mode, and stolen by the hypervisor (from /proc/stat)."""
    user, nice, system, _, _, _, _, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / ticks, steal / ticks


def waited_children_cpu_seconds() -> float:
    """CPU seconds of the benchmark's children that have been waited for: the wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_counted(wrk: str, target: Target, args: argparse.Namespace) -> tuple[WrkRun, int, Background]:
    """As `measure`; also how many requests the warm-up completed (to relate the mirror's copies to requests),
    and how much CPU went elsewhere during the measured run."""
    warm = 0
    if args.warmup > 0:
        output, _, _ = run_wrk(wrk, target, duration=args.warmup, connections=args.connections, threads=args.threads)
        warm = int(parse_wrk(output)["requests"])
    (busy, steal), wrk_cpu, started = machine_cpu_seconds(), waited_children_cpu_seconds(), time.monotonic()
    run = measure(wrk, target, argparse.Namespace(**{**vars(args), "warmup": 0}))
    elapsed = time.monotonic() - started
    busy_after, steal_after = machine_cpu_seconds()
    wrk_cpu = waited_children_cpu_seconds() - wrk_cpu
    others = busy_after - busy - run.cpu_s - wrk_cpu
    return run, warm, Background(round(others / elapsed, 3), round((steal_after - steal) / elapsed, 3))


def report(variants: dict[str, Variant], info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    base = variants["node"]
    ratios = {
        name: {
            "throughput": v.summary.median_requests_per_s / base.summary.median_requests_per_s,
            "p50_latency": v.summary.median_p50_ms / base.summary.median_p50_ms,
            "p99_latency": v.summary.median_p99_ms / base.summary.median_p99_ms,
            "cpu_per_request": v.summary.median_cpu_us_per_request / base.summary.median_cpu_us_per_request,
        }
        for name, v in variants.items()
    }
    print(
        f"\nexecute through an alias vs the node — {args.connections} connections, {args.duration:g} s x "
        f"{args.rounds} rounds (warm-up {args.warmup:g} s), wrk {min(args.threads, args.connections)} threads"
    )
    print(f"machine: nproc {info['nproc']} ({info['cpu_model']}), Python {info['python']}, load {info['load']}")
    header = (
        f"{'variant':<13} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'(front)':>8} "
        f"{'x req/s':>8} {'x p50':>6} {'x p99':>6} {'x CPU':>6}  rounds req/s"
    )
    print(header)
    print("-" * len(header))
    for name, v in variants.items():
        s, r = v.summary, ratios[name]
        rounds = ", ".join(f"{x:.0f}" for x in s.rounds_requests_per_s)
        print(
            f"{name:<13} {s.median_requests_per_s:>7.0f} {s.median_p50_ms:>7.2f} {s.median_p99_ms:>7.2f} "
            f"{s.median_cpu_us_per_request:>10.0f} {v.median_front_cpu_us_per_request:>8.0f} "
            f"{r['throughput']:>8.2f} {r['p50_latency']:>6.2f} {r['p99_latency']:>6.2f} "
            f"{r['cpu_per_request']:>6.2f}  {rounds}"
        )
    busy_rounds({name: [b.others_cores for b in v.background] for name, v in variants.items()})
    mirror = variants["alias-mirror"].mirror
    copies, requests = sum(m.copies for m in mirror), sum(m.requests for m in mirror)
    if requests:
        print(
            f"alias-mirror: {copies} shadow copies for {requests} requests ({100 * copies / requests:.1f} %, "
            f"declared {MIRROR_PERCENT} %); agree {sum(m.agree for m in mirror)}, "
            f"differ {sum(m.differ for m in mirror)}, error {sum(m.error for m in mirror)}"
        )
    errors = {name: v.summary.errors for name, v in variants.items() if v.summary.errors}
    if errors:
        print(f"\n!!! ERRORS during measurement: {errors}; these figures are not valid !!!", file=sys.stderr)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            **wrk_settings(args),
            "route_keys_per_wrk_thread": ROUTE_KEYS,
            "mirror_percent": MIRROR_PERCENT,
        },
        "machine": info,
        "variants": {name: asdict(v) for name, v in variants.items()},
        "ratios_to_node": ratios,
        "errors": errors,
    }


def parse_args() -> argparse.Namespace:
    return parse_wrk_args(__doc__, duration=6, per="variant")


def main() -> int:
    args = parse_args()
    wrk = ensure_wrk()
    load = os.getloadavg()  # before we add any: how busy the machine was when the run started

    def body(servers: list[Server], tmp: Path) -> int:
        print(f"Starting cellnode serve, deploying {' and '.join(NODES)} and three aliases ...")
        dep = deploy(tmp, servers)
        print("Checking each variant answers the documented call and routes as declared:")
        checks = check_routing(dep)
        runs: dict[str, list[WrkRun]] = {name: [] for name in VARIANTS}
        background: dict[str, list[Background]] = {name: [] for name in VARIANTS}
        mirror: list[MirrorCount] = []
        for round_number in range(1, args.rounds + 1):
            # Each round starts one variant later, so that no variant always runs first or after the mirror.
            shift = (round_number - 1) % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                for server in servers:
                    server.check_running()
                before = mirror_totals(dep) if name == "alias-mirror" else {}
                run, warm, background_cpu = measure_counted(wrk, dep.targets[name], args)
                runs[name].append(run)
                background[name].append(background_cpu)
                if name == "alias-mirror":
                    time.sleep(SETTLE_S)
                    after = mirror_totals(dep)
                    delta = {k: after[k] - before[k] for k in after}
                    counts = (delta["requests"], delta["agree"], delta["differ"], delta["error"])
                    mirror.append(MirrorCount(warm + run.requests, *counts))
                print(
                    f"  round {round_number}/{args.rounds} {name:<12}: {run.requests_per_s:>6.0f} req/s, "
                    f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                    f"{run.cpu_us_per_request:.0f} CPU us/req, errors {run.errors}; others used "
                    f"{background_cpu.others_cores:.2f} cores, steal {background_cpu.steal_cores:.2f}"
                )
        variants = {
            name: Variant(
                summarize(runs[name]),
                statistics.median(r.cpu_us_per_request - r.child_cpu_us_per_request for r in runs[name]),
                background[name],
            )
            for name in VARIANTS
        }
        variants["alias-mirror"].mirror = mirror
        info = {**machine(), "load": [round(x, 2) for x in load]}
        entry = {**report(variants, info, args), "routing_checks": checks, "node_ids": dep.node_ids}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(entry, indent=2) + "\n")
        print(f"\nResults written to {RESULTS.relative_to(ROOT)}")
        return 1 if entry["errors"] else 0

    return run_bench(body)


if __name__ == "__main__":
    sys.exit(main())
