import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_cb.hessian import HessianAccumulator, HessianCallback, attach_hessian_hooks, remove_hooks


def test_accumulator_equals_xtx_over_batches():
    torch.manual_seed(0)
    xs = [torch.randn(3, 5, 16) for _ in range(4)]
    acc = HessianAccumulator(16, torch.float64)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    assert acc.num_tokens == 60
    torch.testing.assert_close(acc.sum, X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.hessian, (X.T @ X / 60).float())


class _Attn(nn.Module):
    """q/k/v fed the same tensor, o fed a different one (the Llama pattern)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) + self.k(x) * self.v(x)))


def test_hooks_share_sibling_accumulators_and_match_direct_products():
    torch.manual_seed(1)
    m = _Attn().double()
    xs = [torch.randn(2, 7, 8, dtype=torch.float64) for _ in range(3)]
    accs, handles = attach_hessian_hooks(dict(m.named_children()), torch.float64)
    with torch.no_grad():
        for x in xs:
            m(x)
    remove_hooks(handles)
    assert accs["q"] is accs["k"] is accs["v"]
    assert accs["o"] is not accs["q"]
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(accs["q"].sum, X.T @ X)
    assert accs["q"].num_tokens == 42
    with torch.no_grad():
        Y = torch.tanh(m.q(X) + m.k(X) * m.v(X))
    torch.testing.assert_close(accs["o"].sum, Y.T @ Y)


class _Wrapper(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))

    def validation_step(self, batch, batch_idx):
        self.net(batch[0])


def test_hessian_callback_in_a_real_validate_run():
    torch.manual_seed(2)
    module = _Wrapper()
    data = torch.randn(20, 6)
    cb = HessianCallback(dtype="float64")
    trainer = L.Trainer(accelerator="cpu", callbacks=[cb], logger=False, enable_progress_bar=False)
    trainer.validate(module, DataLoader(TensorDataset(data), batch_size=6))
    h = cb.hessians
    assert set(h) == {"net.0", "net.2"}
    X = data.double()
    torch.testing.assert_close(h["net.0"].double(), X.T @ X / 20, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        Y = torch.relu(module.net[0](data)).double()
    torch.testing.assert_close(h["net.2"].double(), Y.T @ Y / 20, rtol=1e-5, atol=1e-6)


def test_bad_dtype_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="dtype"):
        HessianCallback(dtype="float16")
