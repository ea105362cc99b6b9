r"""Triton kernels of a flat bucket's update: every entry read and written once (imported only
where Triton is; the launchers and the formula: :mod:`.triton_update`).

Compiled for a GPU by ``triton.jit``, or, with ``TRITON_INTERPRET=1`` set before Triton is
imported, run by Triton's interpreter on CPU tensors (how the tests check the kernels without
a GPU). Arithmetic is in float32 whatever the bucket's dtype, and a
row's norm is a sum of squares in float32.
"""

# no ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations
import triton
import triton.language as tl


@triton.jit
def _gradient(g_ptr, m_ptr, w, offs, keep, decay,
              SIGNED: tl.constexpr, MASKED: tl.constexpr, DECAYED: tl.constexpr):
    """The gathered gradient: −G to maximise, times the fixed mask, plus the weight decay's
    δ W (the order of :func:`.flat.gather`)."""
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    if SIGNED:
        g = -g
    if MASKED:
        g = g * tl.load(m_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    if DECAYED:
        g = g + decay * w
    return g


@triton.jit
def _direction(g, b_ptr, offs, keep, momentum, dampen,
               MOMENTUM: tl.constexpr, DAMPENED: tl.constexpr, NESTEROV: tl.constexpr):
    """The momentum B ← m B + (1 − d) G, stored, and the step direction (B, G + m B with
    Nesterov, G without momentum)."""
    d = g
    if MOMENTUM:
        b = tl.load(b_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        if DAMPENED:  # noqa: SIM108 (a constexpr branch, resolved when compiled)
            b = b * momentum + dampen * g
        else:
            b = g + momentum * b
        tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=keep)
        if NESTEROV:  # noqa: SIM108
            d = g + momentum * b
        else:
            d = b
    return d


@triton.jit
def _store_weights(w_ptr, m_ptr, w, offs, keep, MASKED: tl.constexpr):
    """W, kept at zero outside the fixed mask (:func:`.flat.write_back`)."""
    if MASKED:
        w = w * tl.load(m_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=keep)


@triton.jit
def group_rows(g_ptr, b_ptr, w_ptr, v_ptr, m_ptr, lam_ptr, lam, k, momentum, dampen, decay,
               v_rate, pull_rate, step, kappa, norm_scale, tiny,
               SIGNED: tl.constexpr, MASKED: tl.constexpr, DECAYED: tl.constexpr,
               MOMENTUM: tl.constexpr, DAMPENED: tl.constexpr, NESTEROV: tl.constexpr,
               LAM_COLUMN: tl.constexpr, OUTSIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One row (filter / neuron) of a ``group`` bucket per program: ‖V_r‖ over the row, then
    B, V and W of the row in one pass."""
    row = tl.program_id(0).to(tl.int64)
    base = row * k
    cols = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, k, BLOCK):
        keep = start + cols < k
        v = tl.load(v_ptr + base + start + cols, mask=keep, other=0.0).to(tl.float32)
        squares += v * v
    norm = tl.sqrt(tl.sum(squares, axis=0)) * norm_scale
    if LAM_COLUMN:
        lam = tl.load(lam_ptr + row).to(tl.float32)
    shrink = tl.maximum(norm - lam, 0.0) / tl.maximum(norm, tiny)
    for start in range(0, k, BLOCK):
        keep = start + cols < k
        offs = base + start + cols
        w = tl.load(w_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        g = _gradient(g_ptr, m_ptr, w, offs, keep, decay, SIGNED, MASKED, DECAYED)
        d = _direction(g, b_ptr, offs, keep, momentum, dampen, MOMENTUM, DAMPENED, NESTEROV)
        gap = w - kappa * (v * shrink)
        tl.store(v_ptr + offs, (v + v_rate * gap).to(v_ptr.dtype.element_ty), mask=keep)
        if OUTSIDE:  # the pull on the units outside supp(Γ) only
            gap = tl.where(shrink == 0.0, gap, 0.0)
        _store_weights(w_ptr, m_ptr, w - pull_rate * gap - step * d, offs, keep, MASKED)


@triton.jit
def entries(g_ptr, b_ptr, w_ptr, v_ptr, m_ptr, lam_ptr, lam, k, n, momentum, dampen, decay,
            v_rate, pull_rate, step, kappa,
            SIGNED: tl.constexpr, MASKED: tl.constexpr, DECAYED: tl.constexpr,
            MOMENTUM: tl.constexpr, DAMPENED: tl.constexpr, NESTEROV: tl.constexpr,
            LASSO: tl.constexpr, LAM_COLUMN: tl.constexpr, OUTSIDE: tl.constexpr,
            BLOCK: tl.constexpr):
    """A block of entries of a ``lasso`` bucket (Γ = κ (V − clamp(V, −λ, λ)), λ per row of
    length ``k`` with ``LAM_COLUMN``), or of an uncoupled one (``LASSO`` off: the momentum
    step only)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    w = tl.load(w_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    g = _gradient(g_ptr, m_ptr, w, offs, keep, decay, SIGNED, MASKED, DECAYED)
    d = _direction(g, b_ptr, offs, keep, momentum, dampen, MOMENTUM, DAMPENED, NESTEROV)
    if LASSO:
        v = tl.load(v_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        if LAM_COLUMN:
            lam = tl.load(lam_ptr + offs // k, mask=keep, other=0.0).to(tl.float32)
        gap = w + kappa * (tl.minimum(tl.maximum(v, -lam), lam) - v)
        tl.store(v_ptr + offs, (v + v_rate * gap).to(v_ptr.dtype.element_ty), mask=keep)
        if OUTSIDE:
            gap = tl.where(tl.abs(v) <= lam, gap, 0.0)
        w = w - pull_rate * gap
    _store_weights(w_ptr, m_ptr, w - step * d, offs, keep, MASKED)
