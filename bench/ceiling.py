"""The ceiling: a bare aiohttp loop making the service's calls (one IMS token, then one
`POST /data/foundation/import/batches` per dataset id with the body and headers the service sends) at
the same concurrency, with nothing else: no queue, no store, no limiter, no retries, no logs.

    .venv/bin/python bench/ceiling.py --url http://127.0.0.1:8081 --ids ids.txt --concurrency 16 \\
        --report ceiling.json

It is the most this machine gives a Python asyncio client against the simulator on the same cores,
so the service's throughput is reported as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CLIENT_ID, CLIENT_SECRET, CONCURRENCY, ORG_ID  # a script's neighbour


async def bare_loop(url: str, dataset_ids: list[str], concurrency: int) -> dict[str, int]:
    import aiohttp

    outcomes = {"created": 0, "failed": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        form = {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "openid",
        }
        async with session.post(url + "/ims/token/v3", data=form) as resp:
            resp.raise_for_status()
            token = (await resp.json())["access_token"]
        headers = {
            "Authorization": f"Bearer {token}",
            "x-api-key": CLIENT_ID,
            "x-gw-ims-org-id": ORG_ID,
            "x-sandbox-name": "prod",
            "Accept": "application/json",
        }
        create_url = url + "/data/foundation/import/batches"
        pending = iter(dataset_ids)

        async def worker() -> None:
            for dataset_id in pending:  # one shared iterator: each id is taken by one worker
                body = {"datasetId": dataset_id, "inputFormat": {"format": "json"}, "externalId": dataset_id}
                async with session.post(create_url, json=body, headers=headers) as resp:
                    data = await resp.json(content_type=None)
                ok = resp.status == 201 and isinstance(data, dict) and "id" in data
                outcomes["created" if ok else "failed"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/ceiling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", required=True, help="one dataset id per line")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--report", help="where to write the client's own counts (JSON)")
    args = parser.parse_args(argv)
    ids = [line.strip() for line in Path(args.ids).read_text(encoding="utf-8").splitlines() if line.strip()]
    outcomes = asyncio.run(bare_loop(args.url, ids, args.concurrency))
    if args.report:
        Path(args.report).write_text(json.dumps(outcomes), encoding="utf-8")
    else:
        print(json.dumps(outcomes))
    return 0 if outcomes["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
