"""The per-tensor kernel (core/kernels.py): a large tensor stepped block by block of rows gives
exactly the numbers of the whole-tensor step, for every penalty whose units are rows."""

from __future__ import annotations

import pytest
import torch

from dessilbi.core import kernels
from dessilbi.core.penalties import PENALTIES, Penalty, register_penalty
from dessilbi.core.update import dessilbi_update

HP = dict(lr=0.1, kappa=1.0, nu=2.0, lambda_=0.5, group_norm="l2", momentum=0.9,
          dampening=0.0, nesterov=False, weight_decay=0.0)


def run(penalty: str, steps: int = 3, **changes) -> list[torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(600, 500) * 0.1  # 300,000 entries: above ROW_BLOCK
    v = torch.randn_like(w) if penalty != "none" else None
    bufs: list[torch.Tensor | None] = [None]
    for _ in range(steps):
        g = torch.randn_like(w) * 0.01
        dessilbi_update([w], [g], bufs, [v], penalty=penalty, foreach=False,
                        **{**HP, **changes})
    return [t for t in (w, v, bufs[0]) if t is not None]


@pytest.mark.parametrize("penalty", ["group", "lasso", "none"])
@pytest.mark.parametrize("changes", [{}, {"nesterov": True}, {"weight_decay": 1e-3},
                                     {"dampening": 0.3}, {"group_norm": "rms"}])
def test_blocks_of_rows_give_the_whole_tensor_step(penalty, changes, monkeypatch):
    assert kernels.ROW_BLOCK < 600 * 500
    blocked = run(penalty, **changes)
    monkeypatch.setattr(kernels, "ROW_BLOCK", 10**9)
    whole = run(penalty, **changes)
    for a, b in zip(blocked, whole):
        assert torch.equal(a, b)


class Columns(Penalty):
    """Group lasso over columns: a unit spans every row, so no block of rows holds one."""

    name = "test_columns"

    def prox(self, v, lambda_, group_norm="l2"):
        norms = v.norm(dim=0, keepdim=True)
        return v * (norms - lambda_).clamp_min(0) / norms.clamp_min(1e-30)


def test_a_penalty_whose_units_span_rows_is_stepped_whole(monkeypatch):
    register_penalty(Columns())
    try:
        default = run("test_columns")
        monkeypatch.setattr(kernels, "ROW_BLOCK", 10**9)
        whole = run("test_columns")
    finally:
        PENALTIES.pop("test_columns")
    for a, b in zip(default, whole):
        assert torch.equal(a, b)
