"""Rollup upkeep (Celery beat): retention, shard folding and coarse gauge rows."""

from celery import shared_task

from controlplane.telemetry import retention


@shared_task(name="telemetry.prune_rollups")
def prune_rollups() -> int:
    return retention.prune_rollups()


@shared_task(name="telemetry.compact_gauges")
def compact_gauges() -> int:
    return retention.compact_gauges()


@shared_task(name="telemetry.fold_shards")
def fold_shards() -> int:
    return retention.fold_shards()
