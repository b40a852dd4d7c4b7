"""Telemetry ingest as the pipeline it is, one step a module, each readable and testable alone:

1. `validate`: a batch's bytes become a `TelemetryBatch` or a rejection, before the batch
   joins a flush (both transports, the same limits and words);
2. `authorize`: a node may report only what the control plane placed on it;
3. `merge`: a flush's batches summed into rollup rows (10 s, then 1 min and 1 h);
4. `store`: sequence numbers claimed and rollups written, exactly once;
5. `publish`: live deltas for the dashboards, after commit.

`gauges` holds each node's open 10 s gauge bucket between flushes.
`controlplane.telemetry.services.store_batches` runs the steps in one transaction.
"""
