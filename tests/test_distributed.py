"""Distributed compression with real torch.distributed (gloo) processes, no SLURM.

One spawn of 2 ranks (module fixture) does all the 2-rank work and saves what each rank ended
with; the tests compare it with independent references: float64 dense math for the Hessian, and
the very same code run in 1 process on all the windows. What may differ between 1 and 2 processes
is stated per test (see ``compress_model``'s docstring for why).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_cb import compress as compress_mod
from lit_cb.block_finetune import BlockFinetuneConfig, finetune_block
from lit_cb.callbacks import CompressionCallback
from lit_cb.compress import (
    CompressionConfig,
    _all_targets,
    capture_block_inputs,
    compress_model,
    run_block,
    salience_scores,
)
from lit_cb.data.datamodule import TokenWindows
from lit_cb.hessian import attach_hessian_hooks, remove_hooks
from lit_cb.quant import registry
from lit_cb.recovery import RecoveryConfig, RecoveryModule
from lit_cb.sensitivity import output_fisher

from .conftest import tiny_llama

WORLD = 2
NUM_WINDOWS, SEQ = 8, 16
CODEBOOK = CompressionConfig(
    method="codebook",
    method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 3},
    hessian_dtype="float64",
    keep_dense=2,
    forward_batch_size=2,
)
AQLM = CompressionConfig(
    method="aqlm",
    method_config={
        "num_codebooks": 2,
        "nbits_per_codebook": 3,
        "in_group_size": 4,
        "beam_size": 2,
        "max_epochs": 2,
        "codebook_steps": 5,
        "init_kmeans_iters": 2,
    },
    hessian_dtype="float64",
    forward_batch_size=2,
)
WITH_FINETUNE = CompressionConfig(
    method="codebook",
    method_config={"in_group_size": 4, "nbits": 4, "kmeans_iters": 3},
    hessian_dtype="float64",
    forward_batch_size=2,
    block_finetune={"epochs": 2, "lr": 1e-3, "batch_size": 2, "val_fraction": 0.25},
)
# The computed-codes trellis (a Viterbi per column block inside block-LDLQ), and the same with data-parallel
# block fine-tuning of its row scales and norms.
_TRELLIS = {
    "method": "trellis",
    "method_config": {"state_bits": 6, "tile_rows": 16, "tile_cols": 8},
    "hessian_dtype": "float64",
    "forward_batch_size": 2,
}
TRELLIS = CompressionConfig(**_TRELLIS)
TRELLIS_FT = CompressionConfig(
    **_TRELLIS, block_finetune={"epochs": 2, "lr": 1e-3, "batch_size": 2, "val_fraction": 0.25}
)
# 9-bit codebooks: int16 codes, which gloo cannot carry (broadcast as bytes; DDP must ignore them).
INT16_CODES = CompressionConfig(
    method="codebook", method_config={"in_group_size": 4, "nbits": 9, "kmeans_iters": 2}, forward_batch_size=4
)
RECOVERY = RecoveryConfig(
    max_steps=4, lr=1e-3, codebook_lr=1e-3, warmup_steps=1, lora_r=4, lora_on_compressed=True, train_codebooks=True
)
FT = BlockFinetuneConfig(epochs=3, lr=1e-4, batch_size=2, val_fraction=0.25, patience=3)


def _windows() -> torch.Tensor:
    return torch.randint(0, 512, (NUM_WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x[rank::world]  # CompressionDataModule.calibration_windows shards this way


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finetune_setup():
    """Block 0 of the tiny model with its linears replaced by CodebookLinears (identity Hessian,
    deterministic), its float outputs as targets, and the inputs of every window."""
    model = tiny_llama(num_layers=1)
    block = model.model.layers[0]
    inputs, kwargs = capture_block_inputs(model, _windows(), torch.device("cpu"), torch.device("cpu"))
    targets = run_block(block, inputs, kwargs, 4, torch.device("cpu"))
    cfg = registry.config_class("codebook")(in_group_size=4, nbits=3, kmeans_iters=2)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        parent, _, child = name.rpartition(".")
        lin = block.get_submodule(name)
        setattr(block.get_submodule(parent), child, registry.quantize_linear(lin, torch.eye(lin.in_features), cfg))
    return block, inputs, targets, kwargs


def _q_proj_hessian(model, windows) -> tuple[torch.Tensor, int]:
    """Hessian sum of block 0's q_proj over ``windows`` via attach_hessian_hooks (all-reduced)."""
    q = model.model.layers[0].self_attn.q_proj
    accs, handles = attach_hessian_hooks({"q": q}, torch.float64)
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        remove_hooks(handles)
    accs["q"].all_reduce()
    return accs["q"].sum.clone(), accs["q"].num_tokens


class _Tokens(L.LightningDataModule):
    """Calibration shards (what CompressionCallback asks for) and random training windows."""

    def calibration_windows(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return _shard(_windows(), rank, world_size)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, 512, (16, SEQ), generator=torch.Generator().manual_seed(1))
        return DataLoader(TokenWindows(ids), batch_size=2)


class _StateAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = _state(pl_module)


def _recovery_trainer(devices: int, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def _lightning_ddp(rank: int, port: int, out: Path) -> dict:
    """Compression + recovery under Lightning's DDP strategy in these already-launched processes
    (as under torchrun or srun: LOCAL_RANK set, so Lightning launches nothing and reuses the group)."""
    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    module = RecoveryModule(tiny_llama(), RECOVERY)
    callbacks = [
        CompressionCallback(INT16_CODES),
        ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=RECOVERY.max_steps),
    ]
    trainer = _recovery_trainer(2, RECOVERY.max_steps, callbacks, strategy="ddp")
    trainer.fit(module, datamodule=_Tokens())
    return {"state": _state(module), "step": trainer.global_step, "world_size": trainer.world_size}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res: dict = {}
        windows = _shard(_windows(), rank, world)
        res["hessian"] = _q_proj_hessian(tiny_llama(), windows)
        res["salience"] = salience_scores(tiny_llama(), windows, CODEBOOK.targets, torch.device("cpu"), 2)
        fmodel = tiny_llama()
        res["fisher"] = output_fisher(fmodel, windows, _all_targets(fmodel, CODEBOOK.targets), torch.device("cpu"))

        # Count block-file writes per rank (rank 0 only may write).
        writes: list[str] = []
        real_save = compress_mod.save_file

        def counting_save(tensors, path, *a, **k):
            writes.append(os.path.basename(path))
            return real_save(tensors, path, *a, **k)

        compress_mod.save_file = counting_save
        try:
            model = tiny_llama()
            rep = compress_model(
                model, windows, CODEBOOK, device="cpu", resume_dir=Path(out) / "blocks", progress=False
            )
        finally:
            compress_mod.save_file = real_save
        res["codebook"] = _state(model)
        res["codebook_kept"] = rep.kept_dense
        res["codebook_errors"] = [r.relative_error for r in rep.layers]
        res["writes"] = writes
        # Resume from the files rank 0 wrote: every block restored, nothing recomputed.
        again = tiny_llama()
        rep2 = compress_model(again, windows, CODEBOOK, device="cpu", resume_dir=Path(out) / "blocks", progress=False)
        res["resumed"] = _state(again)
        res["resumed_errors"] = [r.relative_error for r in rep2.layers]

        model = tiny_llama()
        compress_model(model, windows, AQLM, device="cpu", progress=False)
        res["aqlm"] = _state(model)

        model = tiny_llama()
        rep = compress_model(model, windows, WITH_FINETUNE, device="cpu", progress=False)
        res["with_finetune"] = _state(model)

        model = tiny_llama()
        compress_model(model, windows, TRELLIS, device="cpu", progress=False)
        res["trellis"] = _state(model)
        model = tiny_llama()
        compress_model(model, windows, TRELLIS_FT, device="cpu", progress=False)
        res["trellis_ft"] = _state(model)

        block, inputs, targets, kwargs = _finetune_setup()
        stats = finetune_block(block, _shard(inputs, rank, world), _shard(targets, rank, world), kwargs, FT)
        res["finetune"] = _state(block)
        res["finetune_stats"] = stats

        res["ddp"] = _lightning_ddp(rank, port, Path(out))
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each of 2 ranks ended with, and the 1-process references (same thread count)."""
    out = tmp_path_factory.mktemp("dist")
    # fork: the ranks inherit the imported modules (spawn would re-import torch, transformers,
    # Lightning and peft in each rank, ~10 s of CPU apiece); no process group exists yet here.
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single: dict = {}
        model = tiny_llama()
        rep = compress_model(model, _windows(), CODEBOOK, device="cpu", progress=False)
        single["codebook"], single["codebook_kept"] = _state(model), rep.kept_dense
        single["codebook_errors"] = [r.relative_error for r in rep.layers]
        model = tiny_llama()
        compress_model(model, _windows(), AQLM, device="cpu", progress=False)
        single["aqlm"] = _state(model)
        model = tiny_llama()
        compress_model(model, _windows(), TRELLIS, device="cpu", progress=False)
        single["trellis"] = _state(model)
        block, inputs, targets, kwargs = _finetune_setup()
        single["finetune_initial"] = _state(block)
        single["finetune_stats"] = finetune_block(block, inputs, targets, kwargs, FT)
        single["finetune"] = _state(block)
        single["salience"] = salience_scores(tiny_llama(), _windows(), CODEBOOK.targets, torch.device("cpu"), 2)
        fmodel = tiny_llama()
        single["fisher"] = output_fisher(
            fmodel, _windows(), _all_targets(fmodel, CODEBOOK.targets), torch.device("cpu")
        )
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single, "dir": out}


def _assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {(a[k].double() - b[k].double()).abs().max()})"


def test_hessian_all_reduce_equals_float64_reference(runs):
    model = tiny_llama()
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=_windows(), use_cache=False)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    reference = x.T @ x
    for r, res in enumerate(runs["ranks"]):
        total, count = res["hessian"]
        assert count == NUM_WINDOWS * SEQ, f"rank {r}"
        torch.testing.assert_close(total, reference, rtol=1e-12, atol=1e-12)
    # ... and the ranks hold the very same bits (one all-reduce result).
    assert torch.equal(runs["ranks"][0]["hessian"][0], runs["ranks"][1]["hessian"][0])


def test_layer_split_codebook_two_ranks_equal_one(runs):
    single = runs["single"]
    for r, res in enumerate(runs["ranks"]):
        # float64 Hessians rounded to float32 come out identical here, so everything is bit-equal.
        _assert_states_equal(res["codebook"], single["codebook"], f"codebook rank {r} vs 1 process")
        assert res["codebook_errors"] == single["codebook_errors"]
    assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in single["codebook"].values())


def test_layer_split_aqlm_two_ranks_equal_one(runs):
    for r, res in enumerate(runs["ranks"]):
        _assert_states_equal(res["aqlm"], runs["single"]["aqlm"], f"aqlm rank {r} vs 1 process")


def test_layer_split_trellis_two_ranks_equal_one(runs):
    """The trellis's Viterbi codes and row scales come out bit-equal whether 2 ranks split the layers (each
    quantizing its own with the all-reduced Hessian, then broadcasting) or one process does all."""
    for r, res in enumerate(runs["ranks"]):
        _assert_states_equal(res["trellis"], runs["single"]["trellis"], f"trellis rank {r} vs 1 process")
    codes = [k for k in runs["single"]["trellis"] if k.endswith(".codes")]
    assert len(codes) == 14  # 7 linears x 2 blocks, all trellis


def test_ranks_end_bit_identical_after_trellis_compression_with_block_finetune(runs):
    a, b = runs["ranks"][0]["trellis_ft"], runs["ranks"][1]["trellis_ft"]
    _assert_states_equal(a, b, "trellis + block fine-tuning, rank 0 vs rank 1")
    # fine-tuning moved the row scales away from what the quantizer set (not vacuous)
    moved = [k for k in a if k.endswith(".scales") and not torch.equal(a[k], runs["single"]["trellis"][k])]
    assert moved


def test_output_fisher_of_two_shards_is_that_of_all_windows(runs):
    """Each rank holds half the windows; the per-output Fisher (sums and token counts over ranks) is the
    one process's over all windows, on every rank (compression.row_weighting and the Fisher allocation)."""
    single = runs["single"]["fisher"]
    assert len(single) == 14 and all(float(f.sum()) > 0 for f in single.values())
    for r, res in enumerate(runs["ranks"]):
        assert res["fisher"].keys() == single.keys()
        for n in single:
            torch.testing.assert_close(res["fisher"][n], single[n], rtol=1e-10, atol=0, msg=f"rank {r} {n}")
    for n in single:
        assert torch.equal(runs["ranks"][0]["fisher"][n], runs["ranks"][1]["fisher"][n])


def test_owner_assignment_is_by_cost_and_spreads_the_group():
    owners = compress_mod.D.assign_owners({"q": 16, "k": 4, "v": 4, "gate": 16, "up": 16}, 2)
    assert owners == {"gate": 0, "q": 1, "up": 0, "k": 1, "v": 1}
    assert set(compress_mod.D.assign_owners({"a": 1, "b": 1}, 2).values()) == {0, 1}


def test_data_parallel_block_finetune_matches_one_process(runs):
    single = runs["single"]
    initial, reference = single["finetune_initial"], single["finetune"]
    changed = 0
    for k in reference:
        if not reference[k].is_floating_point():
            continue
        update_1 = reference[k].double() - initial[k].double()
        for res in runs["ranks"]:
            update_2 = res["finetune"][k].double() - initial[k].double()
            # Same steps up to float32 gradient summation order (per rank, then across ranks).
            torch.testing.assert_close(update_2, update_1, rtol=1e-3, atol=1e-6, msg=k)
        changed += int(update_1.abs().max() > 1e-4)
    assert changed >= 5 and single["finetune_stats"]["best_epoch"] == 3  # trained state kept: not vacuous
    s1, s2 = single["finetune_stats"], runs["ranks"][0]["finetune_stats"]
    assert (s2["num_train"], s2["num_val"], s2["epochs"], s2["best_epoch"]) == (
        s1["num_train"],
        s1["num_val"],
        s1["epochs"],
        s1["best_epoch"],
    )
    assert math.isclose(s2["final_val_loss"], s1["final_val_loss"], rel_tol=1e-5)
    assert math.isclose(s2["initial_val_loss"], s1["initial_val_loss"], rel_tol=1e-6)
    # Ranks end bit-identical to each other, norms included.
    _assert_states_equal(runs["ranks"][0]["finetune"], runs["ranks"][1]["finetune"], "finetune rank 0 vs 1")
    assert any("norm" in k for k in reference)


def test_ranks_end_bit_identical_after_compression_with_block_finetune(runs):
    a, b = runs["ranks"][0]["with_finetune"], runs["ranks"][1]["with_finetune"]
    _assert_states_equal(a, b, "compress_model + block fine-tuning, rank 0 vs rank 1")
    assert any("layernorm" in k for k in a)


def test_keep_dense_same_layers_on_all_ranks_and_as_one_process(runs):
    single = runs["single"]
    for res in runs["ranks"]:
        assert res["salience"].keys() == single["salience"].keys()
        for name, score in single["salience"].items():
            assert math.isclose(res["salience"][name], score, rel_tol=1e-9), name
        assert res["codebook_kept"] == single["codebook_kept"]
    assert len(single["codebook_kept"]) == 2


def test_only_rank_zero_writes_block_files_and_all_ranks_resume_from_them(runs):
    r0, r1 = runs["ranks"]
    assert r0["writes"] == ["block_000.safetensors.tmp", "block_001.safetensors.tmp"]
    assert r1["writes"] == []
    blocks = runs["dir"] / "blocks"
    assert sorted(p.name for p in blocks.iterdir()) == [
        "block_000.safetensors",
        "block_001.safetensors",
        "progress.json",
    ]
    for res in (r0, r1):
        _assert_states_equal(res["resumed"], res["codebook"], "resumed vs compressed")
        assert res["resumed_errors"] == res["codebook_errors"]
    # The 2-rank files resume in 1 process too.
    model = tiny_llama()
    compress_model(model, _windows(), CODEBOOK, device="cpu", resume_dir=blocks, progress=False)
    _assert_states_equal(_state(model), r0["codebook"], "1-process resume of 2-rank files")


def test_lightning_ddp_recovery_checkpoint_of_two_ranks_resumes_in_one(runs):
    r0, r1 = runs["ranks"]
    assert r0["ddp"]["world_size"] == 2 and r0["ddp"]["step"] == RECOVERY.max_steps
    # DDP kept the ranks equal (codes were left out of its buffer sync, and are equal anyway).
    _assert_states_equal(r0["ddp"]["state"], r1["ddp"]["state"], "DDP rank 0 vs rank 1")
    codes = [k for k, v in r0["ddp"]["state"].items() if k.endswith(".codes")]
    assert codes and all(r0["ddp"]["state"][k].dtype == torch.int16 for k in codes)

    ckpt = runs["dir"] / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    module = RecoveryModule(tiny_llama(), RECOVERY)
    at_start = _StateAtTrainStart()
    callbacks = [CompressionCallback(INT16_CODES, ckpt_path=ckpt), at_start]
    trainer = _recovery_trainer(1, RECOVERY.max_steps + 2, callbacks, default_root_dir=runs["dir"] / "resumed")
    trainer.fit(module, datamodule=_Tokens(), ckpt_path=ckpt)
    # The 1-process run starts exactly where the 2 ranks stopped (full state dict), then trains on.
    _assert_states_equal(at_start.state, r0["ddp"]["state"], "1-process resume vs 2-rank checkpoint")
    assert trainer.global_step == RECOVERY.max_steps + 2
    after = _state(module)
    assert all(torch.equal(after[k], at_start.state[k]) for k in codes)  # codes stay frozen
