"""Prefect flows of the MoBiQuant pipeline (``compress``, ``promote``, ``watch-releases``) and their parameters
(``params``: every setting of a run, validated before any work).

They run from the checkout (``prefect.yaml`` sets the working directory), so ``flows``, ``tasks`` and
``registry`` are imported from the repository root, not from site-packages.
"""
