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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour
    CONCURRENCY,
    CREATE_PATH,
    fetch_token,
    platform_headers,
    read_ids,
    report_outcomes,
)


async def bare_loop(url: str, dataset_ids: list[str], concurrency: int) -> dict[str, int]:
    import aiohttp

    outcomes = {"created": 0, "failed": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = platform_headers(await fetch_token(session, url))
        create_url = url + CREATE_PATH
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
    outcomes = asyncio.run(bare_loop(args.url, read_ids(args.ids), args.concurrency))
    return report_outcomes(outcomes, args.report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
