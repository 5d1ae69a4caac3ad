"""Workarounds for the Triton versions barkgpt supports, each scoped to the case that needs it.

``patch_interpreter_index``: Triton 3.6's interpreter (TRITON_INTERPRET=1) converts a scalar
tensor to an int with ``int(one_element_array)``, which numpy >= 2.4 rejects ("only
0-dimensional arrays can be converted to Python scalars") at every ``range`` with a runtime
bound. Later Triton squeezes the array first; this gives 3.6 the same conversion. Applied only
under the interpreter, only when numpy >= 2.4, and only to an interpreter whose conversion is
the old one; compiled GPU kernels are untouched.
"""

from __future__ import annotations

import inspect

_OLD_INDEX = "int(self.handle.data))"


def _numpy_at_least(major: int, minor: int) -> bool:
    import numpy as np

    try:
        got = tuple(int(x) for x in np.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - unusual version string
        return True
    return got >= (major, minor)


def needs_interpreter_index_patch() -> bool:
    try:
        from triton.runtime import interpreter
        source = inspect.getsource(interpreter._patch_lang_tensor)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return _OLD_INDEX in source and _numpy_at_least(2, 4)


def patch_interpreter_index() -> bool:
    """Returns True if the interpreter was patched (idempotent)."""
    if not needs_interpreter_index_patch():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_barkgpt_index_patch", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Recorded by the scope like the original's attributes, so it is undone with them.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    _patch_lang_tensor._barkgpt_index_patch = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
