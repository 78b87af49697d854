"""Exercise every CUDA kernel once per dtype and layout, for compute-sanitizer.

Run under each tool, e.g. ``compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py``.
Small shapes keep the instrumented run short; odd sizes, a non-contiguous input and a
non-default stream cover the edge cases. Every result is checked against its reference.
"""

from __future__ import annotations

import torch

from mechinterp import _ops, _reference

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def diagonal_score_cases() -> int:
    checked = 0
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype in DTYPES:
        for batch, heads, seq, offset, first in ((1, 1, 1, 0, 0), (3, 5, 17, 2, 4), (2, 12, 129, 1, 1)):
            pattern = torch.rand(batch, heads, seq, seq, device="cuda", generator=generator).to(dtype)
            layouts = (pattern, pattern.transpose(2, 3).contiguous().transpose(2, 3))
            for tensor in layouts:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())  # the input is made on the default stream
                with torch.cuda.stream(stream):
                    ours = _ops.diagonal_score(tensor, offset=offset, first_query=first)
                stream.synchronize()
                expected = _reference.diagonal_score(tensor, offset=offset, first_query=first)
                torch.testing.assert_close(ours, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
                checked += 1
    return checked


if __name__ == "__main__":
    print(f"diagonal_score: {diagonal_score_cases()} cases match the reference")
