"""Block fine-tuning on a tiny random LlamaDecoderLayer whose linears were AQLM-quantized."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lit_cb.block_finetune import BlockFinetuneConfig, finetune_block, trainable_parameters
from lit_cb.layers import CodebookLinear
from lit_cb.quant.aqlm import AQLMConfig, quantize_aqlm

SEQ, HIDDEN = 16, 64


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=1,
        vocab_size=32,
        attn_implementation="eager",
    )


def _forward_kwargs(config: LlamaConfig, hidden: torch.Tensor) -> dict:
    """What ``LlamaModel.forward`` hands each decoder layer: rotary (cos, sin) and a causal mask."""
    position_ids = torch.arange(SEQ).unsqueeze(0)  # [1, seq]
    cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)  # [1, seq, head_dim] each
    mask = torch.full((SEQ, SEQ), torch.finfo(torch.float32).min).triu(1)[None, None]  # [1, 1, seq, seq]
    return {"position_embeddings": (cos, sin), "attention_mask": mask, "position_ids": position_ids}


def _run(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _quantize_linears(block: nn.Module, x: torch.Tensor, kwargs: dict) -> nn.Module:
    """Replace every nn.Linear by a coarse AQLM CodebookLinear, Hessians from the real inputs."""
    hessians: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, args, _out) -> None:
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + a.T @ a

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        _run(block, x, kwargs)
    for h in handles:
        h.remove()
    quantized = copy.deepcopy(block)
    # Plain k-means initialisation only (max_epochs=0): a layer-wise error that fine-tuning can reduce.
    config = AQLMConfig(
        num_codebooks=1, nbits_per_codebook=8, in_group_size=8, max_epochs=0, hessian_weighted_init=False
    )
    for name, module in list(quantized.named_modules()):
        if isinstance(module, nn.Linear):
            hess = (hessians[name] / hessians[name].diagonal().mean()).float()
            layer = quantize_aqlm(module.weight.detach(), hess, config, None)
            parent = quantized.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], layer)
    return quantized


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on shared CPUs (50x faster there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup() -> tuple:
    torch.manual_seed(0)
    config = _llama_config()
    block = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    channel_scale = torch.randn(HIDDEN).exp()  # uneven channels, as in real residual streams
    calib = torch.randn(24, SEQ, HIDDEN) * channel_scale
    held_out = torch.randn(8, SEQ, HIDDEN) * channel_scale
    kwargs = _forward_kwargs(config, calib)
    with torch.no_grad():
        calib_targets, held_targets = _run(block, calib, kwargs), _run(block, held_out, kwargs)
    quantized = _quantize_linears(block, calib, kwargs)
    return quantized, kwargs, calib, calib_targets, held_out, held_targets


def _mse(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict) -> float:
    with torch.no_grad():
        return float(((_run(block, x.to(torch.float32), kwargs).float() - y) ** 2).mean())


def test_finetune_lowers_held_out_block_error(setup) -> None:
    quantized, kwargs, calib, calib_targets, held_out, held_targets = setup
    block = copy.deepcopy(quantized)
    codes_before = {n: b.clone() for n, b in block.named_buffers() if n.endswith("codes")}
    before = _mse(block, held_out, held_targets, kwargs)
    stats = finetune_block(
        block,
        calib,
        calib_targets,
        kwargs,
        BlockFinetuneConfig(epochs=10, lr=3e-3, batch_size=4, val_fraction=0.25, patience=2),
    )
    after = _mse(block, held_out, held_targets, kwargs)
    assert after < 0.8 * before, (before, after, stats)
    assert stats["final_val_loss"] < stats["initial_val_loss"]
    assert stats["final_train_loss"] < stats["initial_train_loss"]
    assert stats["num_val"] == 6 and stats["num_train"] == 18 and stats["epochs"] >= 1
    # Codes are frozen buffers; trained parameters end frozen again.
    for n, b in block.named_buffers():
        if n.endswith("codes"):
            assert torch.equal(b, codes_before[n])
    assert all(not p.requires_grad for _, p in trainable_parameters(block, BlockFinetuneConfig()))
    # The reported losses are the real MSEs of the state the block keeps.
    assert stats["final_train_loss"] + stats["final_val_loss"] > 0
    full = _mse(block, calib, calib_targets, kwargs)
    assert full == pytest.approx((18 * stats["final_train_loss"] + 6 * stats["final_val_loss"]) / 24, rel=1e-4)


def test_trainable_set_is_codebooks_scales_norms(setup) -> None:
    block = setup[0]
    names = {n for n, _ in trainable_parameters(block, BlockFinetuneConfig())}
    linears = [n for n, m in block.named_modules() if isinstance(m, CodebookLinear)]
    assert len(linears) == 7
    expected = {f"{n}.{p}" for n in linears for p in ("codebooks", "scales")}
    expected |= {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert names == expected
    no_norms = {n for n, _ in trainable_parameters(block, BlockFinetuneConfig(train_norms=False))}
    assert no_norms == {f"{n}.{p}" for n in linears for p in ("codebooks", "scales")}


def test_fp16_block_trains_in_fp32_and_tuple_outputs(setup) -> None:
    quantized, kwargs, calib, calib_targets, _, _ = setup

    class TupleBlock(nn.Module):
        """Mimics older transformers decoder layers that return ``(hidden_states, ...)``."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, **kw) -> tuple[torch.Tensor, None]:
            return self.inner(x, **kw), None

    block = TupleBlock(copy.deepcopy(quantized)).half()
    norm_before = block.inner.input_layernorm.weight.detach().clone()
    stats = finetune_block(
        block,
        calib.half(),
        calib_targets.half(),
        kwargs,
        BlockFinetuneConfig(epochs=2, lr=1e-3, batch_size=8, val_fraction=0.25),
    )
    assert all(p.dtype == torch.float16 for p in block.parameters())
    assert stats["final_val_loss"] <= stats["initial_val_loss"]
    if stats["best_epoch"] > 0:
        assert not torch.equal(block.inner.input_layernorm.weight, norm_before)
    assert all(not p.requires_grad for _, p in trainable_parameters(block, BlockFinetuneConfig()))


def test_zero_epochs_keeps_block_unchanged(setup) -> None:
    block = copy.deepcopy(setup[0])
    state = {k: v.clone() for k, v in block.state_dict().items()}
    stats = finetune_block(block, setup[2], setup[3], setup[1], BlockFinetuneConfig(epochs=0))
    assert stats["epochs"] == 0 and stats["best_epoch"] == 0
    for k, v in block.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", -1),
        ("lr", 0.0),
        ("batch_size", 0),
        ("val_fraction", 1.0),
        ("patience", 0),
        ("relative_tol", -1.0),
        ("adam_beta2", 1.0),
        ("train_norms", "yes"),
        ("seed", -3),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BlockFinetuneConfig(**{field: value})


def test_shape_mismatch_and_dict_round_trip() -> None:
    config = BlockFinetuneConfig(epochs=3, lr=3e-4)
    assert BlockFinetuneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        BlockFinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="inputs and targets"):
        finetune_block(nn.Identity(), torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), {}, config)
