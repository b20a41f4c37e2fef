"""What the experiment scripts share; the scripts in experiments/ are the commands on top. In rooms
by concept, each importing only those listed before it (and errors, files):

    errors          the typed errors the library raises (usage, data, run folder, ...), and Interrupted
    files           files written whole (temporary name, then rename), strict JSON
    science/        the forecasting science: data, LLMTIME, windows, baselines, metrics, LM forecasts
    training/       the pieces of a training loop: state, schedule, step, evaluation
    run/            a run: configs and flags, the script layer (cli), run folder and lock, the run's data,
                    its windows, model loading, checkpoint, devices, data parallel, metrics log
    budget/         FLOPs planned, reserved and charged: planning, booking, accounts
    bench/          the benchmark's pieces: environment, timed cases, profiler phases, tiny checkpoint
    plots           example forecasts, error against horizon and loss curves, as PNG
    reporting       markdown tables and the study's report.md

Each package's __init__ lists its modules; none of them imports anything, so importing one module
loads only what that module needs.
"""
