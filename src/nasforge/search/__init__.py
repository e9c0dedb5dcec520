"""Searching a space: the one search driver (:mod:`~nasforge.search.driver`), strategies as
Optuna samplers (:mod:`~nasforge.search.samplers`), objectives and constraints, Pareto
utilities, and the tabular benchmark (:mod:`~nasforge.search.tabular`)."""
