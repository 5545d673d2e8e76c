"""The Prometheus observer: what the pipeline reports ends up in the exposition, with bounded labels."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.clock import ManualClock
from orchestrator.messages import BatchRequest
from orchestrator.metrics import NAMES, Metrics
from orchestrator.store.sql import SqlBatchStore


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_every_exported_metric_is_named_in_the_list() -> None:
    families = {family.name for family in text_string_to_metric_families(Metrics().exposition().decode())}
    # The parser drops the _total suffix of counters from family names.
    exported = {name.removesuffix("_total") for name in NAMES}
    assert families == exported


def test_observations_are_counted() -> None:
    metrics = Metrics()
    metrics.aep_call("batches.create", 201, 0.2)
    metrics.aep_call("batches.create", None, 30.0)
    metrics.request_finished("created")
    metrics.retry_scheduled("rate limited")
    metrics.limiter_paused(1.5)
    metrics.rate_changed(23.1)
    metrics.credentials(refused=True)
    metrics.message("rejected")
    found = samples(metrics)
    assert found[("orchestrator_aep_calls_total", (("endpoint", "batches.create"), ("status", "201")))] == 1
    assert found[("orchestrator_aep_calls_total", (("endpoint", "batches.create"), ("status", "none")))] == 1
    assert found[("orchestrator_aep_call_duration_seconds_count", (("endpoint", "batches.create"),))] == 2
    assert found[("orchestrator_requests_total", (("outcome", "created"),))] == 1
    assert found[("orchestrator_requests_total", (("outcome", "failed"),))] == 0  # there from the start
    assert found[("orchestrator_retries_total", (("reason", "rate limited"),))] == 1
    assert found[("orchestrator_limiter_paused_seconds_total", ())] == 1.5
    assert found[("orchestrator_limiter_rate", ())] == 23.1
    assert found[("orchestrator_credentials_refused", ())] == 1
    assert found[("orchestrator_messages_total", (("result", "rejected"),))] == 1


async def test_refresh_reads_the_backlog_from_the_store(store: SqlBatchStore, clock: ManualClock) -> None:
    await store.add(BatchRequest(request_id="r1", dataset_id="d"), clock.now())
    await store.add(BatchRequest(request_id="r2", dataset_id="d"), clock.now() + timedelta(seconds=5))
    [claim] = await store.claim("o", 1, 15, clock.now())
    await store.mark_failed(claim, "boom", clock.now())
    metrics = Metrics()
    await metrics.refresh(store, clock.now() + timedelta(seconds=65), events_waiting=3)
    found = samples(metrics)
    assert found[("orchestrator_backlog", (("state", "pending"),))] == 1
    assert found[("orchestrator_backlog", (("state", "failed"),))] == 1
    assert found[("orchestrator_backlog", (("state", "created"),))] == 0
    assert found[("orchestrator_oldest_unfinished_seconds", ())] == 60
    assert found[("orchestrator_events_waiting", ())] == 3
