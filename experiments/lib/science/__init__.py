"""The forecasting science, with no knowledge of runs, ledgers or command lines.

    lotka_volterra  the predator-prey data: its HDF5 format, validated on load, and a generator
    llmtime         LLMTIME: numbers as text and back (encode, decode, alpha, EncodingConfig)
    data            splits by system, token windows for training, forecast prompts
    baselines       persistence, linear autoregression and an ODE fit, forecasting from the same prompts
    metrics         per-horizon errors with standard errors, paired comparisons, sample bands
    forecasting     forecasting with the language model: prompts in, numbers back, FLOPs as they ran
"""
