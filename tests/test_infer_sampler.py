"""The official sampler rules (penalty window, top-k, greedy) and the WER/CER normalisation."""

from __future__ import annotations

import pytest
import torch

from kimi_lora_cli.inference.metrics import ErrorCounts, cer, edit_distance, normalize_text, score, wer
from kimi_lora_cli.inference.sampler import SamplingParams, apply_repetition_penalty, sample


def test_greedy_is_argmax_below_the_temperature_threshold():
    logits = torch.tensor([[0.1, 2.0, 1.9, -3.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]
    assert sample(logits, SamplingParams(temperature=1e-7, top_k=0)).tolist() == [1, 0]
    assert sample(logits[:, None], SamplingParams()).tolist() == [1, 0]  # [B, 1, V] input


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_in_the_window():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    history = torch.tensor([[4, 0, 1, 1]])  # window 3 sees 0, 1, 1 (1 repeated: penalised once)
    out = apply_repetition_penalty(logits, history, penalty=2.0, window=3)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5, 3.0]]  # input untouched


def test_repetition_penalty_needs_penalty_above_one_and_history_longer_than_window():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    assert apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0, window=3) is logits  # len == window
    assert apply_repetition_penalty(logits, torch.tensor([[0, 1, 0, 1]]), 1.0, window=3) is logits
    assert apply_repetition_penalty(logits, None, 2.0, window=0) is logits


def test_penalty_changes_the_greedy_pick_per_row():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    history = torch.tensor([[2, 0], [2, 2]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=1)
    assert sample(logits, params, history).tolist() == [1, 0]  # row 0 repeated 0, row 1 repeated 2


def test_top_k_draws_only_from_the_k_most_likely_and_k1_is_greedy():
    logits = torch.tensor([[1.0, 4.0, 3.9, 0.0, 3.8]]).repeat(400, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    picked = sample(logits, SamplingParams(temperature=1.0, top_k=2), generators=gens)
    assert set(picked.tolist()) == {1, 2}
    hot = sample(logits, SamplingParams(temperature=50.0, top_k=1), generators=gens)
    assert set(hot.tolist()) == {1}


def test_full_multinomial_without_top_k_reaches_every_token():
    logits = torch.zeros(300, 6)
    gens = [torch.Generator().manual_seed(i) for i in range(300)]
    picked = sample(logits, SamplingParams(temperature=1.0, top_k=0), generators=gens)
    assert set(picked.tolist()) == set(range(6))


def test_low_temperature_sharpens_the_draws():
    logits = torch.tensor([[2.0, 1.5, 1.0]]).repeat(300, 1)

    def share_of_best(t):
        gens = [torch.Generator().manual_seed(i) for i in range(300)]
        return (sample(logits, SamplingParams(temperature=t, top_k=0), generators=gens) == 0).float().mean()

    assert share_of_best(0.05) > 0.99 > share_of_best(1.0)


def test_each_row_uses_its_own_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=0)
    together = sample(logits, params, generators=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = sample(logits[1:2], params, generators=[torch.Generator().manual_seed(8)])
    again = sample(logits, params, generators=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert together[1] == alone[0]
    assert together.tolist() == again.tolist()


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -1}, {"repetition_penalty": 0.0},
                                    {"repetition_window": -2}])
def test_bad_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("raw, normalised", [
    ("Hello, World!", "hello world"),
    ("  the   QUICK\tbrown\nfox  ", "the quick brown fox"),
    ("Don't stop", "dont stop"),
    ("It\u2019s fine.", "its fine"),
    ("well-known (x)", "well known x"),
    ("\uff21\uff22\uff23 \uff11\uff12", "abc 12"),  # full-width letters and digits
    ("\u4f60\u597d\uff0cKimi\u3002", "\u4f60 \u597d kimi"),  # CJK split per character, CJK punctuation gone
    ("\u3053\u3093\u306b\u3061\u306f", "\u3053 \u3093 \u306b \u3061 \u306f"),
    ("", ""),
])
def test_normalisation(raw, normalised):
    assert normalize_text(raw) == normalised


def test_wer_and_cer_counts():
    assert wer("The cat sat.", "the cat sat") == 0.0
    assert wer("the cat sat down", "the bat sat") == pytest.approx(2 / 4)  # one substitution, one deletion
    assert wer("a b", "a b c d") == pytest.approx(1.0)  # two insertions
    assert cer("abcd", "abd") == pytest.approx(1 / 4)
    assert cer("the cat", "thecat") == 0.0  # spaces do not count for CER
    assert wer("\u4f60\u597d\u4e16\u754c", "\u4f60\u597d\u4e16") == pytest.approx(1 / 4)  # CJK: per character
    assert wer("", "") == 0.0 and wer("", "extra") == 1.0
    assert edit_distance("kitten", "sitting") == 3


def test_corpus_rates_sum_edits_over_reference_lengths():
    total = ErrorCounts()
    total.add(score("one two three four", "one two three four"))
    total.add(score("five six", "five seven"))
    assert (total.word_errors, total.ref_words, total.samples) == (1, 6, 2)
    assert total.wer == pytest.approx(1 / 6)  # not the mean of 0 and 0.5


def test_long_pair_counts_known_edits():
    """3,000 words with 30 substitutions, 20 deletions and 10 insertions placed apart: 60 edits."""
    ref = [f"w{i}" for i in range(3000)]
    hyp = list(ref)
    for i in range(30):
        hyp[100 * i] = f"x{i}"  # substitutions at 0, 100, ..., 2900
    for i in range(20):
        hyp[100 * i + 50] = None  # deletions at 50, 150, ...
    hyp = [w for w in hyp if w is not None]
    for i in range(10):
        hyp.insert(200 * i + 20, f"ins{i}")
    counts = score(" ".join(ref), " ".join(hyp))
    assert (counts.word_errors, counts.ref_words) == (60, 3000)
    assert edit_distance(ref, hyp) == 60
