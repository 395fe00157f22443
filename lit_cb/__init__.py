"""lit_cb: compress LLMs to 2-3 bits/weight with learned codebooks, recover with LoRA, run fast.

Importing lit_cb registers its transformers quantization method (``quant_method: "lit_cb"``, see
:mod:`lit_cb.hf_quantizer`), so ``AutoModelForCausalLM.from_pretrained`` loads lit_cb folders. The
registration waits until transformers loads its quantizer registry (importing transformers takes
seconds; ``import lit_cb`` and ``lit_cb generate --help`` should not).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_QUANTIZER_REGISTRY = "transformers.quantizers.auto"


def _register_quantizer() -> None:
    module = sys.modules.get("lit_cb.hf_quantizer")
    if module is not None and not hasattr(module, "register"):
        # lit_cb.hf_quantizer is being imported right now (its own import of transformers' quantizers
        # triggered this); it registers itself when it has finished.
        return
    from lit_cb.hf_quantizer import register

    register()


class _RegisterWhenTransformersLoadsQuantizers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``transformers.quantizers.auto`` is imported it wraps the real loader
    so that lit_cb's quantizer is registered right after that module has run, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _QUANTIZER_REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the other finders try; nothing to wrap
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:  # not earlier: the import system may be iterating sys.meta_path
                sys.meta_path.remove(self)
            _register_quantizer()

        loader.exec_module = exec_then_register
        return spec


def _install_registration() -> None:
    if _QUANTIZER_REGISTRY in sys.modules:
        _register_quantizer()
    elif not any(isinstance(f, _RegisterWhenTransformersLoadsQuantizers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenTransformersLoadsQuantizers())


_install_registration()
