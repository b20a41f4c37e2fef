"""The pieces of a training loop, each small enough to test alone, with no knowledge of run folders,
configs or the ledger.

    state           the run's state (steps, data position, early stopping), the kept weights, finite losses
    schedule        each step's batch (an order that depends only on seed and epoch) and learning rate
    step            one LoRA training step (forward, chunked CE, backward), shared with the benchmarks
    evaluation      what an evaluation scores (windows' CE, validation forecasts) and the selection score
"""
