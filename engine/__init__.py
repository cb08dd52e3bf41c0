"""A training engine for ResNeXt on hashtag-labelled images, with fused kernels."""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """An install maps the top-level kernels/ folder to engine.kernels; a source checkout
    used in place (`python setup.py build_ext --inplace`, as on a bare GPU machine) gets
    the same mapping here."""
    if "engine.kernels" in _sys.modules or _importlib_util.find_spec("engine.kernels") is not None:
        return
    init = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if init.is_file():
        spec = _importlib_util.spec_from_file_location("engine.kernels", init,
                                                       submodule_search_locations=[str(init.parent)])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules["engine.kernels"] = module
        # The import system binds a submodule to its parent; a hand-made one must be bound here
        # (`engine.kernels.x` by attribute, as torch.compile's tracing resolves it).
        globals()["kernels"] = module
        spec.loader.exec_module(module)


_map_source_kernels()
