#!/usr/bin/env bash
# The chaos trial through the CLI: N requests (300 by default) against the simulator answering ~30 %
# of calls with faults (429 and 503 with Retry-After, 500, 502, connections dropped before and after
# the create, answers slower than the timeout), issuing 5-second tokens.
# Usage: bench/chaos-trial.sh [N]      (from the repository root, after `make test` or `make demo`)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/trial-lib.sh
. "$root/bench/trial-lib.sh"
trial_start_simulator --token-lifetime 5 --latency 0.02 --latency-jitter 0.03 \
  --throttle-rate 0.05 --unavailable-rate 0.05 --error-rate 0.08 --drop-before-rate 0.04 \
  --drop-after-rate 0.04 --slow-rate 0.04 --slow-delay 3 --catalog-lag 0.3 --seed 21
export ORCH_AEP__TIMEOUT=2 ORCH_AEP__CATALOG_SETTLE=${ORCH_AEP__CATALOG_SETTLE:-2}
trial_run "${1:-300}"
trial_report
