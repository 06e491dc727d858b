"""Prefect tasks (``calibration``, ``release``) and the plain functions they are thin over.

``stages`` holds each pipeline stage as a plain function over paths (what a task calls; tested without
Prefect), ``gate`` the quality checks a candidate must pass. Tasks take and return paths, hashes and numbers
(never tensors), so any task runner (threads, processes, Dask workers) can run them.
"""

from tasks.run_log import send_library_warnings_to_run_logs

# A task runs in this process, in a process runner's child or on a Dask worker: each imports this package first.
send_library_warnings_to_run_logs()
