"""Float comparisons that hold on any x86 CPU for a correct implementation and fail for a wrong one.

Two computations of the same tensor along different paths (a shared-prompt forward against a plain one, a
fused kernel against a loop, another CPU's float32 summation order) differ by rounding, and rounding scales
with the tensor's *largest* values, not with each element: an element-wise relative tolerance fails on the
elements near zero, where rounding of the large terms that cancelled there is all that is left. So the
tolerance here is set by the tensor's own scale: every element must lie within `rel` times the largest
|want| of the expected value, and the whole difference within `rel` of want's norm. A wrong implementation
(a dropped term, a wrong scale, a missing mask) moves the tensor by a sizeable fraction of its scale and
fails both. torch's mismatch report (which element, by how much) is kept in the message.
"""

from __future__ import annotations

import torch

# float32 rounding along different summation orders: ~1e-6 of the scale for the sums these tests run
# (tens to thousands of terms); 1e-4 leaves room for that and still catches any error above 0.01% of it.
REL = 1e-4


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, rel: float = REL, name: str = "") -> None:
    """Assert `got` equals `want` to float rounding at want's own scale (see the module docstring)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want64.abs().max().item() if want64.numel() else 0.0
    label = f"{name}: " if name else ""
    if scale == 0.0:
        assert torch.equal(got64, want64), (
            f"{label}expected all zeros, got max |x| {got64.abs().max().item()}"
        )
        return
    torch.testing.assert_close(
        got64,
        want64,
        rtol=0.0,
        atol=rel * scale,
        msg=lambda report: f"{label}{report}\n(tolerance {rel:g} x the largest |expected| {scale:.4g})",
    )
    relative_norm = ((got64 - want64).norm() / want64.norm()).item()
    assert relative_norm <= rel, f"{label}|got - want| / |want| = {relative_norm:.3g} > {rel:g}"


def assert_dicts_close_at_scale(got: dict, want: dict, rel: float = REL) -> None:
    """`assert_close_at_scale` for every tensor of two dicts with the same (non-empty) keys, e.g. gradients."""
    assert want, "nothing to compare"
    assert got.keys() == want.keys(), f"keys differ: {sorted(set(got) ^ set(want))}"
    for name, value in want.items():
        assert_close_at_scale(got[name], value, rel=rel, name=name)
