#!/usr/bin/env python3
"""mDNS figures: how long until `kiosk discover` lists N agents, and how fast `kiosk resolve` is.

Builds a LAN of network namespaces (tests/mdns_netns.py: one bridge, one namespace
per host), starts N `kiosk agent`s, and measures from a client namespace:
  - from launching the agents until discover lists all N (includes each agent's
    start: interpreter, host-name probe 1 s, service probes 0.75 s);
  - discover alone, once they are up: time until the N-th kiosk is listed;
  - resolve latency (the in-process call the CLI makes: fresh socket, query,
    answer), median and p95 over --resolves lookups; and the whole
    `kiosk resolve` command's wall time (interpreter start-up included).
Needs root. Usage: sudo .venv/bin/python bench/mdns.py [--agents 20] [--resolves 50]
                                                       [--agent-python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def client(agents: int, resolves: int, t0: float) -> dict:
    """Runs inside the client namespace; returns the figures."""
    from kiosk.net.discover import discover
    from kiosk.net.mdns import resolve

    enough = lambda found: len(found) >= agents  # noqa: E731
    while len(discover(timeout=5, until=enough)) < agents:
        if time.time() - t0 > 120:
            raise SystemExit("not all agents were listed within 120 s")
    all_listed = time.time() - t0

    discover_runs = []
    for _ in range(5):
        start = time.monotonic()
        found = discover(timeout=10, until=enough)
        assert len(found) == agents, len(found)
        discover_runs.append(time.monotonic() - start)

    latencies = []
    for i in range(resolves):
        start = time.monotonic()
        addresses = resolve(f"kiosk-{i % agents + 1:02d}", timeout=3)
        latencies.append(time.monotonic() - start)
        assert addresses, f"kiosk-{i % agents + 1:02d} did not resolve"

    first = []  # the same without the 20 ms settle window: socket set-up + query + first answer + close
    for i in range(resolves):
        start = time.monotonic()
        assert resolve(f"kiosk-{i % agents + 1:02d}", timeout=3, settle=0)
        first.append(time.monotonic() - start)

    cli = []
    for i in range(10):
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "kiosk", "resolve", f"kiosk-{i + 1:02d}"], capture_output=True,
                           env=ENV)
        cli.append(time.monotonic() - start)
        assert r.returncode == 0, r.stderr

    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    return {
        "all_listed_after_launch_s": round(all_listed, 2),
        "discover_until_all_listed_ms": {"median": ms(statistics.median(discover_runs)),
                                         "max": ms(max(discover_runs))},
        "resolve_ms": {"n": resolves, "median": ms(statistics.median(latencies)),
                       "p95": ms(percentile(latencies, 95)), "max": ms(max(latencies))},
        "resolve_first_answer_ms": {"n": resolves, "median": ms(statistics.median(first)),
                                    "p95": ms(percentile(first, 95))},
        "resolve_command_wall_ms": {"n": len(cli), "median": ms(statistics.median(cli))},
    }


def goodbyes(lan, laptop, agents: list, count: int) -> dict:
    """Stop `count` agents one by one; time from SIGTERM until `discover --watch` reports it gone."""
    import queue
    import signal
    import threading

    watch = laptop.popen(sys.executable, "-m", "kiosk", "discover", "--watch", "--json", stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=str(ROOT))
    events: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [events.put(json.loads(line)) for line in watch.stdout], daemon=True).start()
    added = 0
    while added < len(agents):
        added += events.get(timeout=30)["event"] == "added"
    seen = []
    for proc in agents[:count]:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while events.get(timeout=30)["event"] != "removed":
            pass
        seen.append(time.monotonic() - start)
        proc.wait(timeout=10)
    watch.send_signal(signal.SIGINT)
    return {"n": count, "median": round(statistics.median(seen) * 1000, 1), "max": round(max(seen) * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--resolves", type=int, default=50)
    parser.add_argument("--agent-python", default=sys.executable,
                        help="interpreter for the agents (e.g. /usr/bin/python3 with bookworm's python3-zeroconf)")
    parser.add_argument("--client", type=float, metavar="T0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        print(json.dumps(client(args.agents, args.resolves, args.client)))
        return 0
    if os.geteuid() != 0:
        print("bench/mdns.py: needs root (network namespaces)", file=sys.stderr)
        return 1

    from mdns_netns import Lan, make_state_dir

    zc_version = subprocess.run([args.agent_python, "-c", "import zeroconf; print(zeroconf.__version__)"],
                                capture_output=True, text=True).stdout.strip()
    with Lan() as lan, tempfile.TemporaryDirectory() as tmp:
        laptop = lan.add_host()
        hosts = [lan.add_host() for _ in range(args.agents)]
        t0 = time.time()
        for i, host in enumerate(hosts, 1):
            state = make_state_dir(Path(tmp) / host.ns, f"kiosk-{i:02d}", generation=i)
            host.popen(args.agent_python, "-m", "kiosk", "agent", "--state-dir", str(state),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=str(ROOT))
        r = laptop.run(sys.executable, str(Path(__file__).resolve()), "--client", repr(t0), "--agents",
                       str(args.agents), "--resolves", str(args.resolves), timeout=600, env=ENV)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            return 1
        figures = json.loads(r.stdout)
        figures["goodbye_seen_ms"] = goodbyes(lan, laptop, agents=lan.procs[:], count=min(5, args.agents))
    figures.update(cores=os.cpu_count(), agents=args.agents, agent_zeroconf=zc_version,
                   client_zeroconf=__import__("zeroconf").__version__)
    print(f"cores: {figures['cores']}; {args.agents} agents on zeroconf {zc_version}, "
          f"client on zeroconf {figures['client_zeroconf']}")
    print(f"all {args.agents} listed by discover, counted from launching the agents: "
          f"{figures['all_listed_after_launch_s']} s")
    d = figures["discover_until_all_listed_ms"]
    print(f"discover, agents already up, until the {args.agents}th is listed: median {d['median']} ms, "
          f"max {d['max']} ms (5 runs)")
    res = figures["resolve_ms"]
    print(f"resolve latency over {res['n']} lookups: median {res['median']} ms, p95 {res['p95']} ms, "
          f"max {res['max']} ms")
    f = figures["resolve_first_answer_ms"]
    print(f"  of which the answer itself (no 20 ms settle window): median {f['median']} ms, p95 {f['p95']} ms")
    print(f"`kiosk resolve` command wall time (interpreter start-up included): median "
          f"{figures['resolve_command_wall_ms']['median']} ms")
    g = figures["goodbye_seen_ms"]
    print(f"goodbye: from SIGTERM until discover --watch reports the kiosk gone: median {g['median']} ms, "
          f"max {g['max']} ms ({g['n']} agents)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
