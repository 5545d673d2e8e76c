#!/usr/bin/env bash
# The issue's chaos trial through the CLI: 300 requests against the simulator answering ~30 % of
# calls with faults (429 and 503 with Retry-After, 500, 502, connections dropped before and after the
# create, answers slower than the timeout) and issuing 5-second tokens.
# Usage: bench/chaos-trial.sh [N]      (from the repository root, after `make test` or `make demo`)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
n=${1:-300}
work=$(mktemp -d)
port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/orchestrator" simulate --port "$port" --token-lifetime 5 --latency 0.02 --latency-jitter 0.03 \
  --throttle-rate 0.05 --unavailable-rate 0.05 --error-rate 0.08 --drop-before-rate 0.04 \
  --drop-after-rate 0.04 --slow-rate 0.04 --slow-delay 3 --catalog-lag 0.3 --seed 21 \
  > "$work/simulator.log" 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null; rm -rf "$work"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 50); do curl -fs "$url/_sim/stats" >/dev/null 2>&1 && break; sleep 0.1; done
export ORCH_AEP__BASE_URL=$url ORCH_AEP__IMS_URL=$url ORCH_AEP__CLIENT_ID=sim-client \
  ORCH_AEP__CLIENT_SECRET=sim-secret ORCH_AEP__ORG_ID=SIM0RG0000000000000000@AdobeOrg \
  ORCH_AEP__TIMEOUT=2 ORCH_QUEUE__URL="sqlite:///$work/queue.db" ORCH_STORE__URL="sqlite:///$work/store.db" \
  ORCH_HTTP__PORT=0
"$bin/python" -c "print('\n'.join(f'{i:024x}' for i in range($n)))" | "$bin/orchestrator" enqueue --file -
start=$(date +%s.%N)
"$bin/orchestrator" run --until-idle 2> "$work/run.log"
end=$(date +%s.%N)
"$bin/python" - "$work" "$start" "$end" "$url" <<'PY'
import collections, json, subprocess, sys, urllib.request
work, start, end, url = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
out = subprocess.run([f"{sys.prefix}/bin/orchestrator", "batches", "--json"], capture_output=True, text=True).stdout
states = collections.Counter(json.loads(line)["state"] for line in out.splitlines())
stats = json.load(urllib.request.urlopen(f"{url}/_sim/stats"))
events = collections.Counter(json.loads(l)["event"] for l in open(f"{work}/run.log") if l.startswith("{"))
print(f"run --until-idle: {end - start:.1f} s; records {dict(states)}")
print(f"batches {len(stats['batches'])}, most per dataset {max(stats['batches_per_dataset'].values())}, "
      f"early retries {stats['early_retries']}, max calls in 1 s {stats['max_calls_per_second']}, "
      f"401s {stats['unauthorized']}, tokens {stats['tokens_issued']}, platform calls {stats['platform_calls']}")
print(f"faults {stats['faults']}")
print(f"events {dict(events.most_common(12))}")
PY
