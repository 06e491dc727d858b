"""Prefect tasks: thin wrappers over ``registry.stages`` and the registry helpers.

Tasks take and return paths, hashes and numbers (never tensors), so any task runner (threads,
processes, Dask workers) can run them and Prefect can persist their results.
"""
