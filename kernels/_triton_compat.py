"""Work-around for the Triton interpreter (``TRITON_INTERPRET=1``) under NumPy >= 2.4.

The interpreter of Triton 3.6 stores scalars as 1-element arrays and converts
them with ``int(array)``, which NumPy 2.4 rejects ("only 0-dimensional arrays
can be converted to Python scalars"; triton-lang/triton issue 9171, fixed
upstream after 3.6). Loops with run-time bounds then fail in the interpreter.
When the interpreter is on and the bug is present, re-register ``__index__``
with an explicit element read. Compiled (GPU) Triton is not touched.
"""

from __future__ import annotations

import os


def _apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - no triton / no interpreter
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_apbv_patched", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._apbv_patched = True
    _interp._patch_lang_tensor = _patch_lang_tensor


_apply()
