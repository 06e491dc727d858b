"""Prefect flows of the MoBiQuant pipeline: ``compress``, ``promote`` and ``watch-releases``.

They run from the checkout (``prefect.yaml`` sets the working directory), so ``flows``, ``tasks`` and
``registry`` are imported from the repository root, not from site-packages.
"""
