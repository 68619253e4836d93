"""The float64 oracle of the residual add + LayerNorm tests (tests/test_kernel_layer_norm.py,
tests/test_ext_layer_norm.py): the op normalises ``s = x + residual`` as stored, rounded to
residual_dtype, so the exact reference normalises those stored values too."""

import torch


def at_stored_s(x, r, s_dtype):
    """``x`` (float64) shifted so that ``x + r`` is the sum as the op stores it, rounded to
    ``s_dtype``, with an identity gradient: the float64 reference then normalises the values
    the op normalises and differentiates the op as defined (the rounding passed straight
    through), in float64 throughout. No shift without a residual or for a float64 ``s``."""
    if r is None or s_dtype == torch.float64:
        return x
    with torch.no_grad():
        shift = (x + r).to(s_dtype).double() - (x + r)
    return x + shift
