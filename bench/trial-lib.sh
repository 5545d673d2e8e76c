# Shared by the CLI trials (chaos-trial.sh, lag-trial.sh): source it, then `trial_start_simulator
# ARGS...`, `trial_run N`, `trial_report`. Needs `root` set to the repository root.
bin="$root/.venv/bin"
work=$(mktemp -d)

trial_start_simulator() {
  local port
  port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$bin/orchestrator" simulate --port "$port" "$@" > "$work/simulator.log" 2>&1 &
  sim=$!
  trap 'kill $sim 2>/dev/null; rm -rf "$work"' EXIT
  url="http://127.0.0.1:$port"
  for _ in $(seq 50); do curl -fs "$url/_sim/stats" >/dev/null 2>&1 && break; sleep 0.1; done
  export ORCH_AEP__BASE_URL=$url ORCH_AEP__IMS_URL=$url ORCH_AEP__CLIENT_ID=sim-client \
    ORCH_AEP__CLIENT_SECRET=sim-secret ORCH_AEP__ORG_ID=SIM0RG0000000000000000@AdobeOrg \
    ORCH_QUEUE__URL="sqlite:///$work/queue.db" ORCH_STORE__URL="sqlite:///$work/store.db" ORCH_HTTP__PORT=0
}

# Enqueue N dataset ids and run the service until idle; its log goes to $work/run.log.
trial_run() {
  "$bin/python" -c "print('\n'.join(f'{i:024x}' for i in range($1)))" | "$bin/orchestrator" enqueue --file -
  start=$(date +%s.%N)
  "$bin/orchestrator" run --until-idle 2> "$work/run.log" || echo "run --until-idle exited $?"
  end=$(date +%s.%N)
}

# What the store recorded, checked against what the simulator holds.
trial_report() {
  "$bin/orchestrator" batches --json > "$work/records.json"
  "$bin/python" - "$work" "$start" "$end" "$url" <<'PY'
import collections, json, sys, urllib.request
from orchestrator.messages import external_id_for
work, start, end, url = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
records = [json.loads(line) for line in open(f"{work}/records.json")]
states = collections.Counter(record["state"] for record in records)
stats = json.load(urllib.request.urlopen(f"{url}/_sim/stats"))
live = stats["live_batches"]
wrong = [r for r in records if live.get(external_id_for(r["requestId"])) != [r["batchId"]]]
events = collections.Counter(json.loads(l)["event"] for l in open(f"{work}/run.log") if l.startswith("{"))
print(f"run --until-idle: {end - start:.1f} s; records {dict(states)}")
print(f"batches made {len(stats['batches'])}, requests with more than one batch "
      f"{len(stats['duplicate_external_ids'])}, with more than one live batch "
      f"{len(stats['live_duplicate_external_ids'])}, whose one live batch is not the recorded one {len(wrong)}")
print(f"early retries {stats['early_retries']}, max calls in 1 s {stats['max_calls_per_second']}, "
      f"401s {stats['unauthorized']}, tokens {stats['tokens_issued']}, platform calls {stats['platform_calls']}")
print(f"faults {stats['faults']}")
print(f"events {dict(events.most_common(14))}")
PY
}
