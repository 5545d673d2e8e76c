#!/usr/bin/env bash
# A catalog that lists a new batch only LAG seconds (4 by default) after it was made, with 10 % of
# creates made and then their connection dropped and 5 % answered after the 2 s timeout: through the
# CLI, every request must end `created` with exactly one live batch in AEP, the one recorded.
# ORCH_AEP__CATALOG_SETTLE is the default unless set (set it below LAG to see reconciliation abort
# the extra batches that a too-short window lets through).
# Usage: bench/lag-trial.sh [N] [LAG]   (from the repository root, after `make test` or `make demo`)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/trial-lib.sh
. "$root/bench/trial-lib.sh"
trial_start_simulator --catalog-lag "${2:-4}" --drop-after-rate 0.1 --slow-rate 0.05 --slow-delay 3 --seed 3
export ORCH_AEP__TIMEOUT=2
trial_run "${1:-200}"
trial_report
