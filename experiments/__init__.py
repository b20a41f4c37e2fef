"""The study around the model code: the predator-prey data (lotka_volterra), the LLMTIME text
encoding (llmtime), leak-free splits, token windows and forecast prompts (data), and the scripts
that train, evaluate and forecast with them. A package so that scripts and tests import the same
code: ``from experiments import data, llmtime, lotka_volterra``.
"""
