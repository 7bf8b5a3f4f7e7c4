"""The vocabulary every Tandem part shares: requests' sampling parameters, outputs, errors,
prefix-block hashes, chat messages and the typed messages between the router, the control
plane and the workers.

Torch-free and dependency-free by rule (tests/unit/test_import_rules.py): the router and the
control plane import only this package, `proto/`, `telemetry/`, `prefix_cache/` and their own.
"""
