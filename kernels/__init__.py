"""Triton kernels, installed as engine.kernels. They depend on torch and triton only."""

import dataclasses
import os


def _interpreter_without_discarded_overflow_checks() -> None:
    """Triton's interpreter (TRITON_INTERPRET=1: the CPU tests, selftest on a CPU) redoes
    every 32-bit integer add, sub and mul in 64 bits to check it for overflow, then hands
    the verdict to device_assert, which drops it unless debug is on, and the interpreter's
    options never turn debug on (Triton 3.6 and 3.8). The checks took a quarter to a third
    of an interpreted kernel's time and decide nothing, so they are off while debug is off;
    every value a kernel computes is the same. (Here, not beside the kernels: a jit
    function's cache key holds its line number, and the compile gate's record its key.)"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # `import engine` needs no Triton (the GPU machine's bare checkout)
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is not None and not options.debug and options.sanitize_overflow:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


_interpreter_without_discarded_overflow_checks()
