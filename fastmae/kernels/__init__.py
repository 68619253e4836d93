"""fastmae's Triton kernels, one op per module.

Importing this package needs ``triton``; :mod:`fastmae.ops` imports the modules lazily,
so ``import fastmae`` works without it. Each module holds the ``@triton.jit`` kernels of
one op, its host wrapper, its ``torch.library`` registration (``fastmae::<name>``) and
autograd. Inputs are validated by :mod:`fastmae.ops` before they reach a kernel.
"""
