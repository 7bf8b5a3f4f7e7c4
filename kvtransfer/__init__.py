"""Moving paged KV blocks from a prefill process to a decode process.

The package owns the blocks in flight: transfer handles, leases that keep the sender's blocks
pinned until the receiver acknowledges or the lease expires, coalescing of scattered blocks into
few large sends, and transports over torch.distributed (NCCL on GPUs, gloo on CPUs). Control
messages travel in a fixed binary format; nothing here ever unpickles data from another process.

It may import engine types and torch, never Ray, gRPC, Redis or asyncio.

Modules:
    protocol  who frees what and when (the ownership rules), TransferConfig, results, metrics.
    sender    KVSender: the prefill side of one pair (offer, ship in layer chunks, lease).
    receiver  KVReceiver: the decode side of one pair (reserve, receive, verify, hand over).
    pair      forming a pair on demand: ReceiverEndpoint (decode) and connect_pair (prefill).
    control   the control connection: framed messages over TCP, refusing anything else.
    messages  the control messages (hello, offer, ready, done, ack, abort), struct-encoded.
    transport PairChannel: a 2-rank communicator between two workers, formed on demand from a
              rendezvous store (gloo between CPU processes, NCCL between GPUs).
    rendezvous a pair's rendezvous store over its authenticated control connection.
    handshake the challenge-response on the cluster secret that opens a control connection.
    network   where KV endpoints listen (address, interface, port range).
    coalesce  gathering scattered blocks into one staging tensor for a single send, and
              scattering it back into the receiver's blocks; the bounded staging pool.
    layout    KVLayout: model id and KV block geometry both ends must share.
"""
