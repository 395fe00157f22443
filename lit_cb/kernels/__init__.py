"""Triton kernels for lit_cb's compressed linear layers (installed as ``lit_cb.kernels``).

Importing this package does not import Triton; :mod:`.dispatch` imports the kernels only when a call
needs them, so CPU-only users of ``CodebookLinear`` pay nothing.
"""

__all__ = ["dispatch"]
