"""`tandem bench`: a serving benchmark over the gRPC API (Tandem/Generate, streamed).

The tree: `workload` builds the requests, `arrival` decides when they are sent, `client` sends
one and records its timestamps, `runner` drives a whole run, `metrics` turns the recorded
timestamps into the serving metrics of docs/benchmarks.md (as `vllm bench serve` defines them) with
pure functions, `slo` parses SLOs, `report` writes JSON and tables, `plot` draws PNGs, `cli` is
the command line. Nothing here imports torch or the engine; grpc and matplotlib are imported
only by the code that needs them.
"""
