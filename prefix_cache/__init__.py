"""The global prefix-cache index: which worker holds which KV blocks.

`index` looks prompts up (Redis, or the router's own in-process index); `publisher` is the
worker side that records its cache's changes and writes them to Redis. Torch-free.
"""
