"""Sweeps and their reports: progress while a Hydra sweep runs, then one table, figures and the
privacy cost of choosing a run (``dptrain report``); never re-runs training.

``progress`` is the Hydra callback that prints "job k of n"; ``collect`` finds run directories and
reads their artifacts; ``table`` turns them into report rows (CSV, Markdown); ``figures`` draws
accuracy, leakage and empirical lower bounds against epsilon; ``tuning`` bounds the privacy cost of
selecting the best run (Papernot & Steinke 2022); ``build`` writes the whole report.
"""
