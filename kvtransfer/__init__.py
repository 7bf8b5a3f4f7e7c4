"""Moving paged KV blocks from a prefill process to a decode process.

The package owns the blocks in flight: transfer handles, leases that keep the sender's blocks
pinned until the receiver acknowledges or the lease expires, coalescing of scattered blocks into
few large sends, and transports over torch.distributed (NCCL on GPUs, gloo on CPUs). Control
messages travel in a fixed binary format; nothing here ever unpickles data from another process.

It may import engine types and torch, never Ray, gRPC, Redis or asyncio.

Modules:
    coalesce  gathering scattered blocks into one staging tensor for a single send, and
              scattering it back into the receiver's blocks.
    layout    KVLayout: model id and KV block geometry both ends must share.
    messages  the control messages of a transfer (offer, ready, done, ack, abort) and their
              struct-based wire format.
    transport PairChannel: a 2-rank communicator between two workers, formed on demand from a
              TCPStore rendezvous (gloo between CPU processes, NCCL between GPUs).

Not yet here: leases and the ownership protocol, and the engine integration (issue 4).
"""
