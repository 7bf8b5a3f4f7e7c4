"""The gRPC front door: validates and tokenizes requests, admits them, places them on workers
and streams their tokens back. Never imports torch (tests check): it runs on CPU-only hosts."""
