"""The FLOP budget's side of a run: what it will cost, held in the ledger before any model work, and
charged as the work ends.

    planning        FLOPs of runs, evaluations and forecasts from the model's config alone
    booking         the reservation made before any model work, charges as work ends, signals held off
    accounts        the ledger's side of a training run: steps, evaluations and the final batches charged
"""
