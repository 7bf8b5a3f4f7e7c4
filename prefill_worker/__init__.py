"""Prefill workers: Ray actors that compute a prompt's KV and first token, then ship the KV to
the decode worker the router chose (kvtransfer) and return a `contracts.handoff.PrefillResult`.
`held_kv` keeps finished prefills' KV until it ships."""
