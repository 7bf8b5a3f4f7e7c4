"""Decode workers: Ray actors that run an engine and stream tokens (in colocated mode they also
prefill). `engine_loop` drives one engine from a thread; `actor` exposes it to Ray."""
