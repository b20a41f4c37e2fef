"""What the experiment scripts share; the scripts in experiments/ are the commands on top.

    lotka_volterra  the predator-prey data: its HDF5 format, validated on load, and a generator
    llmtime         LLMTIME: numbers as text and back (encode, decode, alpha, EncodingConfig)
    data            splits by system, token windows for training, forecast prompts
    windows         a training run's data cut into training and validation windows, refused if unscorable
    baselines       persistence, linear autoregression and an ODE fit, forecasting from the same prompts
    metrics         per-horizon errors with standard errors, paired comparisons, sample bands
    plots           example forecasts and error against horizon, as PNG
    forecasting     forecasting with the language model: prompts in, numbers back, FLOPs as they ran
    files           files written whole (temporary name, then rename)
    config          what each script is told: TrainConfig, ForecastConfig, EvalConfig, each field one flag
    flagtypes       the values a flag takes (positive integers, fractions, percentiles, ...)
    runs            the run folder, the run's data, the model, the FLOPs reserved, each from a config
    devices         where a script runs: --device auto, and --dtype auto (bf16 only where its matmuls are fast)
    planning        FLOPs of runs, evaluations and forecasts from the model's config alone
    training        train.py's run state (early stopping), batch order, lr schedule, windows' loss, kept weights
    metrics_log     train.py's metrics.jsonl and metrics.csv (cut back on --resume), optionally to wandb
    booking         ledger charges as work ends, the reservation closed on any exit, signals held off
    accounts        the ledger's side of a training run: steps, evaluations and the final batches charged
    parallel        data parallel under torchrun: ranks, a share of each batch, gradients summed
    checkpoint      the resumable training checkpoint, saved and loaded atomically
    validation      what an evaluation scores (validation CE and forecasts) and which adapter is kept
    reporting       markdown tables and the study's report.md
    errors          the typed errors the library raises (usage, data, run folder, checkpoint, ...)
    cli             the one place a script turns those errors into one line and an exit status
    train_step      one LoRA training step (forward, chunked CE, backward), shared with the benchmarks
    bench_env       where a benchmark ran: CPU and its ISA flags, versions, GPU, matmul peak
    bench_cases     the benchmarks' models and timed cases (training step, forecasting, loading)
    bench_phases    torch.profiler phases of a forward and a decode step
"""
