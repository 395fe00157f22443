"""RTN and GPTQ against hand-computed values and independent float64 references."""

from __future__ import annotations

import pytest
import torch

from lit_cb.quant import registry
from lit_cb.quant.dense_quant import GroupQuantLinear
from lit_cb.quant.gptq import GPTQConfig, gptq_quantize, quantize_gptq
from lit_cb.quant.rtn import RTNConfig, quantize_rtn

# ----------------------------------------------------------------------------------------- RTN


def test_rtn_hand_computed_2bit() -> None:
    # Row 0, one group: xmin=-0.45, xmax=1.05 -> scale=1.5/3=0.5, zero=round(0.9)=1,
    #   w/scale = [-0.9, 0.1, 0.6, 2.1] -> round+1 = [0, 1, 2, 3] -> w_hat = [-0.5, 0, 0.5, 1.0].
    # Row 1, all positive: the range is extended to 0: xmin=0, xmax=1.5 -> scale 0.5, zero 0,
    #   w/scale = [1.6, 0.6, 3, 1] -> [2, 1, 3, 1] -> w_hat = [1.0, 0.5, 1.5, 0.5].
    w = torch.tensor([[-0.45, 0.05, 0.3, 1.05], [0.8, 0.3, 1.5, 0.5]])
    layer = quantize_rtn(w, None, RTNConfig(bits=2, group_size=-1))
    assert layer.codes.tolist() == [[0, 1, 2, 3], [2, 1, 3, 1]]
    assert layer.scales.float().flatten().tolist() == [0.5, 0.5]
    assert layer.zeros.float().flatten().tolist() == [1.0, 0.0]
    assert layer.dequantize().tolist() == [[-0.5, 0.0, 0.5, 1.0], [1.0, 0.5, 1.5, 0.5]]
    # 8 bits of codes + 16 (scale) + 16 (zero) per 4-weight row.
    assert layer.bits_per_weight() == 10.0


def test_rtn_hand_computed_groups_and_symmetric() -> None:
    # group_size 2: [-0.5, 1.0] -> scale 0.5, zero 1, codes [0, 3]; [-1.0, 0.5] -> scale 0.5, zero 2, codes [0, 3].
    layer = quantize_rtn(torch.tensor([[-0.5, 1.0, -1.0, 0.5]]), None, RTNConfig(bits=2, group_size=2))
    assert layer.codes.tolist() == [[0, 3, 0, 3]]
    assert layer.zeros.float().tolist() == [[1.0, 2.0]]
    assert layer.dequantize().tolist() == [[-0.5, 1.0, -1.0, 0.5]]
    # symmetric 2-bit: amax 0.75 -> scale 2*0.75/3 = 0.5, zero 2; w/scale = [-1.2, 0.2, 0.6, 1.5]
    #   -> round+2 = [1, 2, 3, 4->3] -> w_hat = [-0.5, 0, 0.5, 0.5].
    layer = quantize_rtn(torch.tensor([[-0.6, 0.1, 0.3, 0.75]]), None, RTNConfig(bits=2, group_size=-1, symmetric=True))
    assert layer.codes.tolist() == [[1, 2, 3, 3]]
    assert layer.dequantize().tolist() == [[-0.5, 0.0, 0.5, 0.5]]


def test_rtn_error_bounded_by_half_step_and_bits_per_weight() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in (2, 3, 4, 8):
        layer = quantize_rtn(w, None, RTNConfig(bits=bits, group_size=64))
        step = layer.scales.float().repeat_interleave(64, dim=1)
        err = (layer.dequantize() - w).abs()
        # Half a step inside the grid; at the ends the integer zero point can clip by up to another
        # half step (the GPTQ convention), plus float16 rounding of the scale.
        assert (err <= 1.01 * step).all()
        assert (err > step / 2 + 1e-6).float().mean() < 0.05
        assert layer.bits_per_weight() == bits + 32 / 64
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(w, None, RTNConfig(bits=4, group_size=96))


# ------------------------------------------------------------------------------ GroupQuantLinear


def test_group_quant_linear_forward_and_g_idx() -> None:
    g = torch.Generator().manual_seed(0)
    out_f, in_f, gs = 6, 16, 4
    codes = torch.randint(0, 8, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, in_f // gs, generator=g) + 0.1
    zeros = torch.randint(0, 8, (out_f, in_f // gs), generator=g).float()
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(5, in_f, generator=g)
    s16, z16 = scales.half().float(), zeros.half().float()
    layer = GroupQuantLinear(codes, scales, zeros, bits=3, group_size=gs, bias=bias)
    expected_w = torch.empty(out_f, in_f)
    for o in range(out_f):
        for j in range(in_f):
            expected_w[o, j] = s16[o, j // gs] * (codes[o, j] - z16[o, j // gs])
    torch.testing.assert_close(layer.dequantize(), expected_w)
    torch.testing.assert_close(layer(x), x @ expected_w.T + bias)
    # Explicit group map (act-order layout).
    g_idx = torch.randperm(in_f, generator=g) % (in_f // gs)
    layer = GroupQuantLinear(codes, scales, zeros, bits=3, group_size=gs, g_idx=g_idx)
    for o in range(out_f):
        for j in range(in_f):
            expected_w[o, j] = s16[o, g_idx[j]] * (codes[o, j] - z16[o, g_idx[j]])
    torch.testing.assert_close(layer(x), x @ expected_w.T)
    assert layer.bits_per_weight() == 3 + 32 / gs + 32 / out_f
    with pytest.raises(ValueError, match="codes"):
        GroupQuantLinear(codes + 8, scales, zeros, bits=3, group_size=gs)


# ------------------------------------------------------------------------------------------ GPTQ


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=torch.float64) + 3 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1  # uneven channels, like LLM activations
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale


def layer_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """The GPTQ objective ||X ΔWᵀ||² / n, computed from X directly in float64."""
    return float(((x @ (w_hat.double() - w.double()).T) ** 2).sum() / x.shape[0])


def ref_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    scale = ((hi - lo) / maxq).half().double()
    return scale, torch.clamp(torch.round(-lo / scale), 0, maxq)


def reference_gptq(
    w: torch.Tensor, h: torch.Tensor, bits: int, gs: int, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain GPTQ: one column at a time, float64, no blocks, no lazy batching. Returns codes in the
    original column order and the group of each column."""
    w, h = w.double().clone(), h.double().clone()
    d = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(d)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(d, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    for j in range(d):
        if j % gs == 0:
            scale, zero = ref_params(w[:, j : j + gs], bits)
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 2**bits - 1)
        codes[:, j] = q
        err = (w[:, j] - scale * (q - zero)) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
    inv = torch.argsort(perm)
    return codes[:, inv].long(), (torch.arange(d) // gs)[inv]


@pytest.mark.parametrize("bits,gs", [(2, -1), (3, 8), (4, 32)])
def test_gptq_identity_hessian_equals_rtn(bits: int, gs: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for h in (torch.eye(64), torch.diag(torch.rand(64) + 0.5)):
        g = quantize_gptq(w, h, GPTQConfig(bits=bits, group_size=gs, block_size=16))
        r = quantize_rtn(w, None, RTNConfig(bits=bits, group_size=gs))
        assert torch.equal(g.codes, r.codes)
        assert torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)


@pytest.mark.parametrize(
    "gs,block_size,act_order",
    [(-1, 16, False), (8, 16, False), (8, 12, False), (16, 8, False), (8, 16, True), (-1, 7, True)],
)
def test_gptq_blocked_equals_column_at_a_time_reference(gs: int, block_size: int, act_order: bool) -> None:
    x = correlated_inputs(512, 48, seed=1)
    x[:, 5] = 0.0  # a dead input channel
    h = x.T @ x / x.shape[0]
    w = torch.randn(12, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = gptq_quantize(w, h, bits=3, group_size=gs, damp=0.01, act_order=act_order, block_size=block_size)
    ref_codes, ref_groups = reference_gptq(w, h, 3, 48 if gs == -1 else gs, 0.01, act_order)
    assert torch.equal(res.codes, ref_codes)
    if act_order and gs != -1:
        assert torch.equal(res.g_idx, ref_groups)
    else:
        assert res.g_idx is None
    group_of_5 = int(res.g_idx[5]) if res.g_idx is not None else (5 // gs if gs > 0 else 0)
    assert (res.codes[:, 5] == res.zeros[:, group_of_5].long()).all()  # dead column -> weight 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [-1, 16])
def test_gptq_objective_not_worse_than_rtn(bits: int, gs: int) -> None:
    x = correlated_inputs(2048, 64, seed=3)
    h = (x.T @ x / x.shape[0]).float()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    rtn = layer_error(x, w, quantize_rtn(w, h, RTNConfig(bits=bits, group_size=gs)).dequantize())
    for act_order, static in [(False, False), (True, False), (True, True)]:
        cfg = GPTQConfig(bits=bits, group_size=gs, act_order=act_order, static_groups=static, block_size=32)
        layer = quantize_gptq(w, h, cfg)
        assert layer.codes.shape == w.shape and layer.dequantize().shape == w.shape
        err = layer_error(x, w, layer.dequantize())
        assert err < 0.9 * rtn, (act_order, static, err, rtn)


def test_gptq_act_order_groups_layout() -> None:
    x = correlated_inputs(1024, 64, seed=5)
    h = (x.T @ x / x.shape[0]).float()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    dynamic = quantize_gptq(w, h, GPTQConfig(bits=3, group_size=16, act_order=True))
    static = quantize_gptq(w, h, GPTQConfig(bits=3, group_size=16, act_order=True, static_groups=True))
    assert dynamic.g_idx is not None and torch.bincount(dynamic.g_idx.long()).tolist() == [16] * 4
    # the first group holds the 16 columns with the largest Hessian diagonal
    top = set(torch.argsort(torch.diagonal(h), descending=True)[:16].tolist())
    assert set(torch.nonzero(dynamic.g_idx == 0).flatten().tolist()) == top
    assert static.g_idx is None and static.scales.shape == (8, 4)
    assert dynamic.bits_per_weight() == pytest.approx(3 + 32 / 16 + 32 / 8)
    x32 = x[:4].float()
    torch.testing.assert_close(dynamic(x32), x32 @ dynamic.dequantize().T)


def test_registry_names() -> None:
    assert registry._BY_NAME["rtn"] is RTNConfig and registry._BY_NAME["gptq"] is GPTQConfig
    assert registry._REGISTRY[GPTQConfig] is quantize_gptq


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (RTNConfig, {"bits": 5}, "bits"),
        (RTNConfig, {"group_size": 0}, "group_size"),
        (RTNConfig, {"symmetric": "yes"}, "symmetric"),
        (GPTQConfig, {"bits": 1}, "bits"),
        (GPTQConfig, {"group_size": -2}, "group_size"),
        (GPTQConfig, {"damp": -0.1}, "damp"),
        (GPTQConfig, {"block_size": 0}, "block_size"),
        (GPTQConfig, {"act_order": 1}, "act_order"),
    ],
)
def test_bad_config_names_field(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_group_quant_linear_save_load_roundtrip(tmp_path) -> None:
    import transformers

    from lit_cb.serialization import load_compressed, save_compressed

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = correlated_inputs(256, 32, seed=7).float()
    h = x.T @ x / x.shape[0]
    attn = model.model.layers[0].self_attn
    attn.q_proj = quantize_gptq(attn.q_proj.weight.detach(), h, GPTQConfig(bits=3, group_size=16, act_order=True))
    attn.k_proj = quantize_rtn(attn.k_proj.weight.detach(), h, RTNConfig(bits=2, group_size=-1))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
        loaded, _, meta = load_compressed(save_compressed(model, tmp_path / "run"))
        got = loaded(ids).logits
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["g_idx"] is True
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, GroupQuantLinear)
    torch.testing.assert_close(got, expected)
