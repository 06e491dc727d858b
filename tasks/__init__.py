"""Prefect tasks (``calibration``, ``release``) and the plain functions they are thin over.

``stages`` holds each pipeline stage as a plain function over paths (what a task calls; tested without
Prefect), ``gate`` the quality checks a candidate must pass. Tasks take and return paths, hashes and numbers
(never tensors), so any task runner (threads, processes, Dask workers) can run them.
"""
