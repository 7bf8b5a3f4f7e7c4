"""What every worker role runs: the engine loop thread, the batched output outbox and the actor
base (`WorkerBase`). Role-neutral: the decode side's and the prefill side's own state live in
`decode_worker/` and `prefill_worker/`, which both build on this package (neither imports the
other). Importing it imports no torch: the engine loads when an actor is constructed."""
