"""Moving paged KV blocks from a prefill process to a decode process: pairs formed on demand,
control messages in a fixed binary format (never unpickled), KV payloads over a pair channel
(gloo between CPUs, NCCL between GPUs), and leases that pin the sender's blocks until the
receiver acknowledges or the lease expires.

It may import engine types and torch, never Ray, gRPC, Redis or asyncio. The modules, the
wire format and the ownership rules: docs/kvtransfer.md.
"""
