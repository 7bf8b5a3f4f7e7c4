"""Decode workers: Ray actors that run an engine and stream tokens (in colocated mode they also
prefill). `actor` exposes the worker to Ray; `kv_arrivals` takes over requests prefilled
elsewhere and joins them to their transferred KV. The engine loop is `worker.engine_loop`."""
