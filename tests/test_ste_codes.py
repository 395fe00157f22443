"""Straight-through code training (``recovery.ste_codes``) and trainable embeddings
(``recovery.train_embeddings``): the assignment against a float64 brute force, the identity at
the start, the gradients against a dense float64 reference, a hand-checked boundary crossing,
real Lightning fits (codes move the loss; a crashed run resumes to the same bits) and the
config's refusals."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_cb.config import load_config
from lit_cb.layers import CodebookFormat, CodebookLinear, nearest_codes, unpack_codes
from lit_cb.pipeline import run
from lit_cb.serialization import load_compressed

from .conftest import TINY_RUN, resume_equals, save_tiny_model
from .test_code_update import _compressed_tiny, _fit, _loss


def _layer(out=6, inp=12, og=1, g=4, nbits=3, seed=0, zero_row=False):
    gen = torch.Generator().manual_seed(seed)
    fmt = CodebookFormat(inp, out, g, og, 1, nbits)
    codes = torch.randint(0, 2**nbits, (out // og, inp // g, 1), generator=gen)
    codebooks = torch.randn(1, 2**nbits, og, g, generator=gen)
    scales = torch.rand(out // og, generator=gen) + 0.5
    if zero_row:
        scales[0] = 0.0
    return CodebookLinear.from_tensors(fmt, codes, codebooks, scales, dtype=torch.float32)


@pytest.mark.parametrize(("og", "nbits", "chunk"), [(1, 3, 1 << 16), (2, 3, 5), (1, 9, 7)])
def test_nearest_codes_match_a_float64_brute_force(og, nbits, chunk):
    """Every group's code is the argmin over all codewords of the float64 distance between the
    group divided by its row scale and the codeword (int16 storage for B = 9; chunks of 5 and 7
    groups that do not divide the count; a row whose scale is 0 may take any code)."""
    layer = _layer(out=8, inp=16, og=og, nbits=nbits, seed=1, zero_row=True)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    got = unpack_codes(nearest_codes(w, layer.codebooks, layer.scales, nbits, chunk=chunk), nbits)
    book = layer.codebooks[0].double().reshape(2**nbits, -1)
    nog, nig = 8 // og, 16 // 4
    for r, c in itertools.product(range(1, nog), range(nig)):  # row group 0 has scale 0
        group = w[r * og : (r + 1) * og, c * 4 : (c + 1) * 4].double().reshape(-1) / float(layer.scales[r])
        dist = ((book - group) ** 2).sum(1)
        assert int(got[r, c, 0]) == int(dist.argmin()), (r, c)


def test_a_latent_moved_past_the_midpoint_takes_the_other_codeword():
    """Hand-checked: codewords 0 = (0, 0, 0, 0) and 1 = (1, 1, 1, 1), scale 2. The latent is in
    codebook units: a group of 0.45 everywhere (weights of 0.9) keeps code 0; at 0.55 it takes
    code 1, and the forward then computes with 2 * (1, 1, 1, 1)."""
    fmt = CodebookFormat(4, 1, 4, 1, 1, 1)
    book = torch.stack([torch.zeros(4), torch.ones(4)]).reshape(1, 2, 1, 4)
    layer = CodebookLinear.from_tensors(fmt, torch.zeros(1, 1, 1, dtype=torch.long), book, torch.tensor([2.0]))
    layer.float()
    layer.start_latent_training()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        layer.latent.fill_(0.45)
        assert float(layer(x)) == 0.0 and int(layer.codes) == 0
        layer.latent.fill_(0.55)
        assert float(layer(x)) == 20.0 and int(layer.codes) == 1
    layer.finish_latent_training()
    assert layer.latent is None and int(layer.codes) == 1


def test_starting_latent_training_changes_neither_codes_nor_outputs():
    layer = _layer(out=6, inp=12, seed=3)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    codes, before = layer.codes.clone(), layer(x)
    layer.start_latent_training()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    assert torch.equal(layer.codes, codes)
    scales = layer.scales.detach().reshape(-1, 1)
    torch.testing.assert_close(layer.latent * scales, layer.dequantize().detach(), rtol=1e-6, atol=1e-7)


def test_the_latent_gets_the_dense_weight_gradient_and_the_codebooks_theirs():
    """Straight-through: the latent's gradient is dL/dW of the same loss through a dense float64
    copy of the weight, times the row scale (the latent is W / scale), and the codebooks' and
    scales' gradients are those of the layer without a latent (frozen codes)."""
    layer = _layer(out=6, inp=12, seed=5)
    plain = copy.deepcopy(layer)
    for m in (layer, plain):
        m.codebooks.requires_grad_(True)
        m.scales.requires_grad_(True)
    layer.start_latent_training()
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(6))
    target = torch.randn(7, 6, generator=torch.Generator().manual_seed(7))
    ((layer(x) - target) ** 2).sum().backward()
    ((plain(x) - target) ** 2).sum().backward()
    w = plain.dequantize().detach().double().requires_grad_(True)
    ((x.double() @ w.T - target.double()) ** 2).sum().backward()
    row_scale = plain.scales.detach().double().reshape(-1, 1)
    torch.testing.assert_close(layer.latent.grad.double(), w.grad * row_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.codebooks.grad, plain.codebooks.grad)
    torch.testing.assert_close(layer.scales.grad, plain.scales.grad)


def test_ste_codes_lower_the_loss_when_only_the_latents_may_move():
    """Three Lightning steps on one fixed batch with every other learning rate ~0: only the latent,
    through the codes, can move the loss. It falls, codes change, and the finished model (no latent
    left) computes the loss the last codes give."""
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(9))
    base = _compressed_tiny(nbits=4, m=1)
    start = _loss(base, ids)
    model = copy.deepcopy(base)
    module, trainer = _fit(model, ids, every=0, steps=3, ste_codes=True, latent_lr=0.3, codebook_lr=1e-12)
    assert trainer.global_step == 3
    final = module.merged_model().float()
    layers = [m for m in final.modules() if isinstance(m, CodebookLinear)]
    assert layers and all(m.latent is None for m in layers)
    changed = sum(
        int((a.codes != b.codes).sum())
        for a, b in zip(layers, (m for m in base.modules() if isinstance(m, CodebookLinear)), strict=True)
    )
    assert changed > 0
    assert _loss(final, ids) < start - 1e-3, (start, _loss(final, ids))


def test_train_embeddings_trains_the_tied_embedding_once_at_its_own_rate():
    model = _compressed_tiny(nbits=4, m=1)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    before = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(9))
    module, _ = _fit(model, ids, every=0, steps=2, train_embeddings=True, embedding_lr=1e-3)
    groups = module.trainer.optimizers[0].param_groups
    emb = [g for g in groups if any(p is model.get_input_embeddings().weight for p in g["params"])]
    assert len(emb) == 1 and len(emb[0]["params"]) == 1 and emb[0]["initial_lr"] == 1e-3
    assert not torch.equal(before, model.get_input_embeddings().weight.detach())


# -- resume --------------------------------------------------------------------------------------

STE_RUN = {
    **TINY_RUN,
    "recovery.max_steps": 6,
    "recovery.train_codebooks": True,
    "recovery.ste_codes": True,
    "recovery.latent_lr": 0.3,
    "recovery.train_embeddings": True,
    "trainer.loggers": "[csv]",
    "eval.recovered": False,
}


def _ste_cfg(model_dir: Path, out: Path):
    values = {**STE_RUN, "output_dir": str(out), "model.name": str(model_dir)}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


class _Crash(RuntimeError):
    pass


def test_ste_recovery_resumed_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_tokenizer, monkeypatch):
    """A run with straight-through codes (and trained codebooks and embeddings) that crashes in
    step 4 and resumes from its crash checkpoint saves the same bits as 6 uninterrupted steps; the
    codes did move, and the saved model holds no latent."""
    import lit_cb.recovery

    save_tiny_model(tmp_path / "model", tiny_tokenizer)
    ref_cfg = _ste_cfg(tmp_path / "model", tmp_path / "a")
    run(ref_cfg)
    reference = load_file(str(ref_cfg.run_dir / "model" / "model.safetensors"))
    assert not any("latent" in k for k in reference)

    original = lit_cb.recovery.RecoveryModule.training_step

    def crashing_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.trainer.global_step == 3:
            raise _Crash("simulated crash")
        return loss

    monkeypatch.setattr(lit_cb.recovery.RecoveryModule, "training_step", crashing_step)
    cfg = _ste_cfg(tmp_path / "model", tmp_path / "b")
    with pytest.raises(_Crash):
        run(cfg)
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and any(k.endswith(".latent") for k in ckpt["state_dict"])
    monkeypatch.undo()
    resume_equals(cfg, reference)


def test_ste_codes_change_the_codes_in_a_real_run(tmp_path, tiny_tokenizer):
    """The same config without ste_codes keeps the compressed codes; with it, some move."""
    save_tiny_model(tmp_path / "model", tiny_tokenizer)
    saved, curves, loaded = {}, {}, {}
    for ste in (False, True):
        values = {
            **STE_RUN,
            "recovery.ste_codes": ste,
            "recovery.val_every_n_steps": 6,
            "output_dir": str(tmp_path / str(ste)),
        }
        cfg = load_config(None, [f"{k}={v}" for k, v in {**values, "model.name": str(tmp_path / "model")}.items()])
        run(cfg)
        saved[ste] = load_file(str(cfg.run_dir / "model" / "model.safetensors"))
        curves[ste] = json.loads((cfg.run_dir / "recovery_curve.json").read_text())
        model, _, _ = load_compressed(cfg.run_dir / "model")
        loaded[ste] = {n: m.codes for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    codes = [k for k in saved[False] if k.endswith(".codes")]
    assert codes
    assert sum(int((saved[False][k] != saved[True][k]).sum()) for k in codes) > 0
    # The curve's codes_changed: the share of codes (one per group; packed several to a byte on
    # disk) that differ from those at the start of training, the frozen run's.
    changed = sum(int((loaded[False][n] != loaded[True][n]).sum()) for n in loaded[False])
    total = sum(c.numel() for c in loaded[False].values())
    assert curves[False]["points"][-1]["codes_changed"] == 0.0
    assert curves[True]["points"][-1]["codes_changed"] == pytest.approx(changed / total, abs=0)
    assert curves[True]["codes_reference_step"] == 0


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["compression.method=aqlm"], "num_codebooks=2"),
        (
            [
                "compression.method=aqlm",
                "compression.method_config={num_codebooks: 1}",
                "compression.bit_budget=2.5",
                "compression.bit_options=[{}, {num_codebooks: 2}]",
            ],
            r"num_codebooks=\[1, 2\]",
        ),
        (["compression.method=rtn"], "compression.method='rtn'"),
        (["recovery.code_update_every=5"], "code_update_every=5"),
        (["recovery.latent_lr=0"], "latent_lr=0"),
        (["recovery.embedding_lr=-1"], "embedding_lr=-1"),
    ],
)
def test_bad_ste_settings_are_refused_before_any_work(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["recovery.ste_codes=true", *overrides])


def test_ste_codes_with_one_aqlm_codebook_is_allowed():
    cfg = load_config(
        None, ["recovery.ste_codes=true", "compression.method=aqlm", "compression.method_config={num_codebooks: 1}"]
    )
    assert cfg.recovery.ste_codes


def test_a_latent_on_a_two_codebook_layer_is_refused():
    fmt = CodebookFormat(8, 4, 4, 1, 2, 3)
    layer = CodebookLinear(fmt, dtype=torch.float32)
    with pytest.raises(ValueError, match="one codebook per group"):
        layer.start_latent_training()
