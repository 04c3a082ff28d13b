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
