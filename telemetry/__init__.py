"""Observability shared by the router, the workers and the control plane: OpenTelemetry
tracing (`tracing`) and the service's Prometheus metrics (`metrics`). Torch-free.
"""
