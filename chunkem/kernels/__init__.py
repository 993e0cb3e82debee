"""Kernels: pure numpy/scipy functions on in-memory arrays (no dask).

Each module holds ``f(block, *, ...) -> ndarray`` functions that the ops hand
to the engine (:func:`chunkem.engine.local.run_local`,
:func:`chunkem.engine.spectral.apply`). They are tested alone against
analytic answers. Import them from their modules, e.g.
``from chunkem.kernels.filters import lowpass_multiplier``.
"""
