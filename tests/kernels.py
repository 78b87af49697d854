"""What the kernel tests share: PyTorch's own tolerances per dtype and the CUDA skip marker."""

from __future__ import annotations

import pytest
import torch

from mechinterp import _C

# (rtol, atol) per dtype: PyTorch's own defaults for assert_close.
TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
DTYPES = list(TOLERANCES)

CUDA_OK = torch.cuda.is_available() and bool(_C.build_info()["cuda"])
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and a CUDA build of mechinterp._C")
