"""The decode loop's sampler (lit_cb.generate._pick) against a float64 top-p reference: the same
kept set, the same renormalised probabilities, the same seeded draw, the same frequencies; with
top_p = 1 the very draw torch.multinomial makes."""

from __future__ import annotations

import pytest
import torch

from lit_cb.generate import _nucleus, _pick


def _reference(logits: torch.Tensor, temperature: float, top_p: float) -> list[dict[int, float]]:
    """Per row: vocabulary index -> renormalised probability of the kept tokens, in float64, from the
    definition (sorted by probability, then index; a token is kept while the mass before it is <= top_p)."""
    out = []
    for row in torch.softmax(logits.double() / temperature, dim=-1):
        ranked = sorted(range(row.numel()), key=lambda i: (-row[i].item(), i))
        kept, before = [], 0.0
        for i in ranked:
            if before > top_p:
                break
            kept.append(i)
            before += row[i].item()
        total = sum(row[i].item() for i in kept)
        out.append({i: row[i].item() / total for i in kept})
    return out


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.5), (1.3, 0.9), (0.7, 0.99), (1.0, 1e-6)])
def test_nucleus_keeps_the_reference_set_with_the_reference_probabilities(temperature, top_p):
    logits = 3 * torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    kept, order = _nucleus(logits, temperature, top_p)
    for row, ref in enumerate(_reference(logits, temperature, top_p)):
        nonzero = kept[row] > 0
        renormalised = (kept[row][nonzero] / kept[row].sum()).double().tolist()
        got = dict(zip(order[row][nonzero].tolist(), renormalised, strict=True))
        assert got.keys() == ref.keys()  # exactly the same tokens
        assert all(abs(got[i] - ref[i]) <= 1e-6 * ref[i] for i in ref)
    if top_p == 1e-6:
        assert torch.equal(_pick(logits, temperature, top_p, torch.Generator()), logits.argmax(-1))


def test_seeded_draw_is_the_exponential_race_over_the_sorted_reference():
    """The draw: Exp(1) numbers from the seeded generator, one per sorted position; the winner is the
    kept token with the largest p / E. Recomputed here in float64 from the reference probabilities."""
    logits = 2 * torch.randn(8, 500, generator=torch.Generator().manual_seed(2))
    drawn = _pick(logits, 1.2, 0.9, torch.Generator().manual_seed(7))
    race = torch.empty(8, 500).exponential_(1, generator=torch.Generator().manual_seed(7)).double()
    for row, ref in enumerate(_reference(logits, 1.2, 0.9)):
        ranked = sorted(ref, key=lambda i: (-ref[i], i))
        winner = max(range(len(ranked)), key=lambda pos: ref[ranked[pos]] / race[row, pos].item())
        assert drawn[row].item() == ranked[winner]
    assert torch.equal(drawn, _pick(logits, 1.2, 0.9, torch.Generator().manual_seed(7)))
    assert not torch.equal(drawn, _pick(logits, 1.2, 0.9, torch.Generator().manual_seed(8)))


def test_draw_frequencies_follow_the_reference():
    row = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    n = 40_000
    drawn = _pick(row.expand(n, -1), 1.3, 0.8, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=40).double() / n
    ref = torch.zeros(40, dtype=torch.float64)
    for i, p in _reference(row, 1.3, 0.8)[0].items():
        ref[i] = p
    assert torch.all(freq[ref == 0] == 0)
    assert torch.all((freq - ref).abs() <= 5 * (ref * (1 - ref) / n).sqrt() + 1e-12)


def test_without_top_p_the_draw_is_torch_multinomial_s():
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(4))
    probs = torch.softmax(logits / 0.8, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9)).squeeze(-1)
    assert torch.equal(_pick(logits, 0.8, 1.0, torch.Generator().manual_seed(9)), expected)
    assert torch.equal(_pick(logits, 0.0, 0.5, None), logits.argmax(-1))  # greedy ignores top_p
