"""A run of a script: what it is told, where it writes, the data and model it works on.

    config          what each script is told: TrainConfig, ForecastConfig, EvalConfig, each field one flag
    flagtypes       the values a flag takes (positive integers, fractions, percentiles, ...)
    cli             the script layer: parsers built from the configs, errors turned into one line and an exit status
    folder          the run folder: its lock, the overwrite/resume policy, the command line saved; seeds
    rundata         the run's data (load, split, encoding) and an adapter's provenance files
    windows         a training run's data cut into windows, and its validation forecast set, from its config
    models          the base model in the dtype asked for, its tokenizer, a saved adapter loaded into it
    checkpoint      the resumable training checkpoint (its layout in the run folder known here alone)
    devices         where a script runs: --device auto, and --dtype auto (bf16 only where its matmuls are fast)
    parallel        data parallel under torchrun: ranks, a share of each batch, gradients summed
    metrics_log     train.py's metrics.jsonl and metrics.csv (cut back on --resume), optionally to wandb
"""
