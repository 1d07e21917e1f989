"""The continuous-batching engine: a paged KV cache, a scheduler that admits requests at every
step, and model runners that run the Triton kernels on GPU (PyTorch references on CPU).

One concept per file, in the shape of nano-vllm: `sequence` (one request's tokens and pages),
`block_manager` (the page allocator), `scheduler` (who runs in the next step), `core` (the
synchronous step loop), `models` (Llama- and Falcon-family forwards over a paged cache),
`runner` (inputs, KV cache, CUDA graphs, sampling), `engine` (the async `Engine` on a thread).
"""
