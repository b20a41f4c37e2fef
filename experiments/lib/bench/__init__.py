"""The benchmark's pieces, shared by benchmark.py and gpu_check.py.

    env             where a benchmark ran: CPU and its ISA flags, versions, GPU, matmul peak, memory
    cases           the benchmarks' models and timed cases (training step, forecasting, loading)
    phases          torch.profiler phases of a forward and a decode step
    tiny            a small random checkpoint with Qwen's real tokenizer files (make_tiny_checkpoint.py's)
"""
