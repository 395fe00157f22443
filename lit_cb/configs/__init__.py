"""Every config dataclass of lit_cb, in modules that import neither torch nor Lightning.

``--help`` and config validation only need these, so they answer in well under a second; the
modules that do the work (``lit_cb.compress``, ``lit_cb.recovery``, ``lit_cb.quant.*``, ...)
re-export their config class from here, so ``from lit_cb.compress import CompressionConfig`` keeps
working. Each field's attribute docstring is its one-line help (``lit_cb <command> --help``
prints them); enumerated values are ``Literal`` types, so the help and the type check list them.
"""
