"""The study around the model code: the scripts on top (train, evaluate, forecast, study, report,
benchmark, make_tiny_checkpoint; each run as ``python experiments/<script>.py``), and underneath
them the library they share, ``experiments.lib``.
"""
