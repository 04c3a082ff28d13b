"""
Shared pytest setup. Triton chooses between compiling a kernel and running it in its CPU interpreter when the
kernel is decorated, and its own library functions (tl.sum, tl.max) are decorated when triton is first imported.
So TRITON_INTERPRET=1 must be set before any module imports triton (fused_loss.py and mla.py do on import), which only this
file, loaded before every test module, can guarantee. Without CUDA the Triton kernel tests then run on the CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def _squeeze_interpreted_index():
    """Triton 3.6's interpreter (the release torch 2.11's CUDA wheels pin) makes a loop bound that a kernel loaded
    into a Python int by int(array), and NumPy >= 2.4 refuses a one-element array there ("only 0-dimensional arrays
    can be converted to Python scalars"), so every kernel whose range() bound is a loaded value (the MLA decode's
    split, the GRPO loss's rows) failed under the interpreter. Later Triton squeezes the array first; this does
    the same, for the interpreter only (compiled CUDA kernels never run this code)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, '_patch_lang_tensor', None)
    if patch is None:
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patched


if os.environ.get('TRITON_INTERPRET') == '1':
    _squeeze_interpreted_index()
