"""The inference engine of one worker: a paged KV cache with prefix caching, a scheduler of
chunked prefill and continuous batching, the Llama model runner (torch on CPU, Triton kernels
and CUDA graphs on GPU), sampling and detokenization. It imports no other Tandem package;
what each module holds and why: docs/engine.md.
"""
