"""Triton kernels for the hot paths, installed as ``ldm_fast.kernels``."""

if __name__ == "kernels":
    # Only from a source checkout: with the repository root on sys.path (`python -m ...` run
    # there, pytest, the bench scripts) this folder is also importable as plain `kernels`, the
    # name of Hugging Face's kernel-hub package, which transformers >= 5.25 imports. Hand the name
    # to that package when it is installed, so transformers (and diffusers through it) work.
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _checkout = Path(__file__).resolve().parents[1]
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _checkout]
    _spec = PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
