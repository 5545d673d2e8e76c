"""The peer row of `make bench`: what an SDK script does, one synchronous call at a time, beside the
service, both against the simulator answering every call after 50 ms (no rate limit).

The peer is this file run as a script: Adobe's `aepp` SDK makes each call with `requests.post(...)`
(no session, so a new connection per call) and waits for its answer before the next, with no
concurrency; here the same, with the standard library's http.client (no new dependency): one IMS
token, then one `POST /data/foundation/import/batches` per dataset id, each on a fresh connection.

    .venv/bin/python bench/peer.py --url http://127.0.0.1:8081 --ids ids.txt --report peer.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    CONCURRENCY,
    CREATE_PATH,
    EMBEDDED,
    NO_LIMIT,
    PY,
    TOKEN_FORM,
    Context,
    RunFigures,
    Section,
    backend_settings,
    bench_command,
    commands_text,
    measure_client,
    measure_service,
    platform_headers,
    read_ids,
    report_outcomes,
    simulator,
)
from throughput import service_settings

LATENCY = ("--latency", "0.05", "--latency-jitter", "0")
PEER_COUNT, QUICK_PEER_COUNT = 200, 60
SERVICE_COUNT, QUICK_SERVICE_COUNT = 2000, 400


def sync_loop(url: str, dataset_ids: list[str]) -> dict[str, int]:
    form = urllib.parse.urlencode(TOKEN_FORM).encode()
    with urllib.request.urlopen(url + "/ims/token/v3", data=form, timeout=30) as resp:  # noqa: S310 (local)
        token = json.loads(resp.read())["access_token"]
    headers = {**platform_headers(token), "Content-Type": "application/json"}
    where = urllib.parse.urlsplit(url)
    outcomes = {"created": 0, "failed": 0}
    for dataset_id in dataset_ids:
        body = json.dumps(
            {"datasetId": dataset_id, "inputFormat": {"format": "json"}, "externalId": dataset_id}
        )
        connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=30)
        try:
            connection.request("POST", CREATE_PATH, body=body, headers=headers)
            response = connection.getresponse()
            data = json.loads(response.read() or b"null")
        finally:
            connection.close()
        ok = response.status == 201 and isinstance(data, dict) and "id" in data
        outcomes["created" if ok else "failed"] += 1
    return outcomes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/peer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", required=True, help="one dataset id per line")
    parser.add_argument("--report", help="where to write the client's own counts (JSON)")
    args = parser.parse_args(argv)
    return report_outcomes(sync_loop(args.url, read_ids(args.ids)), args.report)


# -- the section -------------------------------------------------------------------------------


def run_peer(count: int) -> RunFigures:
    with (
        tempfile.TemporaryDirectory(prefix="orch-peer-") as tmp,
        simulator(Path(tmp), NO_LIMIT, latency=LATENCY) as sim,
    ):
        return measure_client("synchronous loop (aepp-style)", Path(tmp), sim, count, "peer.py", None)


def run_service(count: int) -> RunFigures:
    with tempfile.TemporaryDirectory(prefix="orch-peer-") as tmp:
        workdir = Path(tmp)
        with (
            simulator(workdir, NO_LIMIT, latency=LATENCY) as sim,
            backend_settings(EMBEDDED, workdir) as where,
        ):
            return measure_service("orchestrator", workdir, sim, count, service_settings(where))


def section(ctx: Context) -> Section:
    peer_count = QUICK_PEER_COUNT if ctx.quick else PEER_COUNT
    service_count = QUICK_SERVICE_COUNT if ctx.quick else SERVICE_COUNT
    print(f"  synchronous loop, {peer_count} calls at 50 ms ...", flush=True)
    peer = run_peer(peer_count)
    print(f"    steady {peer.steady_rate:.1f}/s")
    print(f"  orchestrator run --until-idle, {service_count} requests at 50 ms ...", flush=True)
    service = run_service(service_count)
    ratio = service.steady_rate / peer.steady_rate if peer.steady_rate else 0.0
    print(f"    steady {service.steady_rate:.1f}/s ({ratio:.1f} x the synchronous loop)")
    rows = [
        "| client | requests | created | wall s | steady req/s | wall req/s "
        "| x the synchronous loop (steady) "
        "| CPU s / 1,000 req | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in (peer, service):
        x = f"{o.steady_rate / peer.steady_rate:.1f}" if peer.steady_rate else "-"
        rows.append(
            f"| {o.label} | {o.requests} | {o.created} | {o.wall_s:.1f} | {o.steady_rate:.1f} "
            f"| {o.wall_rate:.1f} "
            f"| {x} | {o.cpu_ms_per_request:.2f} | {o.peak_rss_mb:.0f} |"
        )
    commands = [
        bench_command("peer", ctx.quick),
        "# by hand:",
        ".venv/bin/orchestrator simulate --port 8081 --rate-limit 1000000 --rate-period 1 "
        f"{' '.join(LATENCY)} --seed 1 &",
        f"{PY} bench/peer.py --url http://127.0.0.1:8081 --ids ids.txt",
        f"# the service: as in the throughput section (ORCH_LIMITS__RATE={NO_LIMIT}, "
        f"concurrency {CONCURRENCY})",
    ]
    method = (
        "The simulator answers every call after 50 ms (`--latency 0.05 --latency-jitter 0`), no rate limit, "
        f"fresh per run. *Peer*: `bench/peer.py`, {peer_count} creates one at a time, each on a new "
        "connection, as `aepp` does with `requests.post`. *Orchestrator*: "
        f"{service_count} requests, `orchestrator run --until-idle` with no rate limit and its default "
        f"concurrency of {CONCURRENCY}, embedded queue and store. Rates are the simulator's (first batch "
        "to last)."
    )
    text = "\n\n".join([method, "\n".join(rows), commands_text(commands)])
    figures: dict[str, Any] = {
        "latency_s": 0.05,
        "peer": peer.as_dict(),
        "service": service.as_dict(),
        "ratio_steady": round(ratio, 3),
    }
    return Section(
        "peer", "The peer baseline: one synchronous call at a time, at 50 ms", text, figures, commands
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
