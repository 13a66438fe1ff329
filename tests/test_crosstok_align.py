"""Cross-tokenizer alignment (`openkd.distill.crosstok`): tokens by bytes, groups by span, targets.

Real tokenizers built offline (make-tiny's byte-level BPE, seeds 0 and 1) and hand-built ones
(the tokenizers library: byte-level `Ġ`, SentencePiece-style `▁` with `<0x..>` byte fallback),
so every case is exact and fast.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from openkd.distill.crosstok import align, vocab
from openkd.distill.crosstok.aligner import Aligner
from openkd.distill.crosstok.preflight import Coverage, check, measure
from openkd.distill.crosstok.targets import EXACT, MERGED, ULD


def _fast(tok, eos: str = "</s>"):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def byte_level(tokens: list[str]):
    """Byte-level BPE whose merges build `tokens` left to right (each one's prefix listed first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_ = {"</s>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    merges = []
    for token in tokens:
        merges.append((token[:-1], token[-1]))
        vocab_[token] = len(vocab_)
    tok = Tokenizer(models.BPE(vocab=vocab_, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return _fast(tok)


def sentencepiece(tokens: list[str]):
    """SentencePiece-style BPE: `▁` for the space, `<0xNN>` byte fallback, ASCII letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab_ = {"</s>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    for c in "▁abcdefghijklmnopqrstuvwxyz":
        vocab_[c] = len(vocab_)
    merges = []
    for token in tokens:
        merges.append((token[:-1], token[-1]))
        vocab_[token] = len(vocab_)
    tok = Tokenizer(models.BPE(vocab=vocab_, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["</s>"])
    return _fast(tok)


def teacher_row(
    tokenizer, text: str, alternatives: dict[int, list[tuple[str, float]]] | None = None
):
    """The teacher's ids for `text` + EOS, with top-K: its own token at p, named alternatives."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    k = 3
    top_ids = np.zeros((len(ids), k), dtype=np.int64)
    top_lp = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for i, token in enumerate(ids):
        entries = [(token, 0.6)] + [
            (tokenizer.convert_tokens_to_ids(t), p) for t, p in (alternatives or {}).get(i, [])
        ]
        for slot, (tid, p) in enumerate(entries):
            top_ids[i, slot], top_lp[i, slot] = tid, math.log(p)
    return np.array(ids), top_ids, top_lp


def masses(aligned, j: int) -> dict[int, float]:
    t = aligned.targets
    return {
        int(i): float(np.exp(lp))
        for i, lp in zip(t.ids[j], t.logprobs[j], strict=True)
        if np.isfinite(lp)
    }


@pytest.fixture(scope="module")
def tiny_tokenizers():
    from openkd.tiny.model import TinySpec, build_tokenizer

    return build_tokenizer(TinySpec(seed=0)), build_tokenizer(TinySpec(seed=1))


def test_make_tiny_seeds_give_different_vocabularies(tiny_tokenizers):
    t0, t1 = tiny_tokenizers
    v0, v1 = t0.get_vocab(), t1.get_vocab()
    moved = [tok for tok, i in v0.items() if v1.get(tok) != i]
    assert len(moved) > len(v0) // 2  # most ids differ: plain soft labels would be wrong
    assert any(tok not in v1 for tok in v0)  # and some tokens exist in one vocabulary only


def test_identical_tokenisations_map_one_to_one(tiny_tokenizers):
    t0, _ = tiny_tokenizers
    ids, top_ids, top_lp = teacher_row(t0, "stone yellow harbor copper")
    top_ids[:, 1], top_lp[:, 1] = 200, math.log(0.3)  # one more alternative everywhere
    aligned = Aligner(t0, t0, "gold", t0.eos_token_id).align(
        ids, top_ids, top_lp, "stone yellow harbor copper"
    )
    assert aligned.student_ids == ids[:-1].tolist()
    assert (aligned.targets.kind == EXACT).all()  # every answer token and the end of turn
    for j, token in enumerate(ids):
        assert masses(aligned, j) == pytest.approx({int(token): 0.6, 200: 0.3})


def test_other_seed_aligns_by_text(tiny_tokenizers):
    t0, t1 = tiny_tokenizers
    text = "anchor garden purple thunder"
    ids, top_ids, top_lp = teacher_row(t0, text)
    aligned = Aligner(t0, t1, "gold", t1.eos_token_id).align(ids, top_ids, top_lp, text)
    assert t1.decode(aligned.student_ids) == text
    assert aligned.problem is None and (aligned.targets.kind > 0).all()
    eos = masses(aligned, len(aligned.student_ids))
    assert eos == pytest.approx({t1.eos_token_id: 0.6})  # the teacher's EOS is the student's


def test_a_word_split_two_to_one_merges():
    teacher = byte_level(["he", "hel", "hell", "hello"])
    student = byte_level(["he", "hel", "lo"])
    assert teacher.tokenize("hello") == ["hello"] and student.tokenize("hello") == ["hel", "lo"]
    ids, top_ids, top_lp = teacher_row(teacher, "hello", {0: [("hell", 0.2), ("he", 0.1)]})
    aligned = Aligner(teacher, student, "gold", student.eos_token_id).align(ids, top_ids, top_lp)
    hel, lo, he = (student.convert_tokens_to_ids(t) for t in ("hel", "lo", "he"))
    assert aligned.student_ids == [hel, lo]
    assert aligned.targets.kind.tolist()[:2] == [MERGED, MERGED]
    # First position: "hello" (0.6) and "hell" (0.2) both begin with "hel"; "he" is "he".
    assert masses(aligned, 0) == pytest.approx({hel: 0.8, he: 0.1})
    # Then "lo" given "hel": the teacher's "hello" out of all it began with "hel" (chain rule).
    assert masses(aligned, 1) == pytest.approx({lo: 0.6 / 0.8})


def test_two_teacher_tokens_merge_into_one_student_token():
    teacher = byte_level(["he", "hel", "lo"])
    student = byte_level(["he", "hel", "hell", "hello"])
    ids, top_ids, top_lp = teacher_row(teacher, "hello", {0: [("he", 0.3)]})
    aligned = Aligner(teacher, student, "gold", student.eos_token_id).align(ids, top_ids, top_lp)
    hello, he = (student.convert_tokens_to_ids(t) for t in ("hello", "he"))
    assert aligned.student_ids == [hello]
    assert aligned.targets.kind[0] == MERGED
    # "hello" = "hel" then "lo": 0.6 x 0.6; the alternative "he" keeps its own mass.
    assert masses(aligned, 0) == pytest.approx({hello: 0.36, he: 0.3})


def test_a_teacher_token_absent_from_the_student_goes_to_the_tail():
    teacher = byte_level(["ab", "xy"])
    student = byte_level(["ab"])
    ids, top_ids, top_lp = teacher_row(teacher, "ab", {0: [("xy", 0.3)]})
    aligned = Aligner(teacher, student, "gold", student.eos_token_id).align(ids, top_ids, top_lp)
    ab = student.convert_tokens_to_ids("ab")
    target = masses(aligned, 0)
    assert aligned.targets.kind[0] == EXACT and target == pytest.approx({ab: 0.6})
    assert 1 - sum(target.values()) == pytest.approx(0.4)  # "xy"'s 0.3 and the rest: the tail


def test_nothing_mapped_falls_back_to_uld():
    teacher = byte_level([])
    student = byte_level([])
    ids, top_ids, top_lp = teacher_row(teacher, "a")
    top_ids[0, 0] = teacher.eos_token_id  # a special token: no bytes, no mapping
    top_ids[0, 1], top_lp[0, 1] = teacher.eos_token_id, math.log(0.2)
    aligned = Aligner(teacher, student, "gold", 0).align(ids, top_ids, top_lp)
    assert aligned.targets.kind[0] == ULD
    assert np.exp(aligned.targets.logprobs[0][:2]) == pytest.approx([0.6, 0.2])  # sorted


def test_whitespace_prefix_conventions_are_one_token():
    teacher = byte_level(["Ġw", "Ġwo", "Ġwor", "Ġworl", "Ġworld"])
    student = sentencepiece(["▁w", "▁wo", "▁wor", "▁worl", "▁world"])
    t_bytes, s_bytes = vocab.token_bytes(teacher), vocab.token_bytes(student)
    g_world = teacher.convert_tokens_to_ids("Ġworld")
    s_world = student.convert_tokens_to_ids("▁world")
    assert t_bytes[g_world] == s_bytes[s_world] == b" world"
    assert vocab.exact_map(t_bytes, vocab.bytes_index(s_bytes))[g_world] == s_world
    # The SentencePiece prefix space of the first word is not part of the text.
    text = "world world"
    ids, top_ids, top_lp = teacher_row(teacher, text)
    aligned = Aligner(teacher, student, "gold", student.eos_token_id).align(
        ids, top_ids, top_lp, text
    )
    assert aligned.problem is None
    assert aligned.student_ids == [s_world, s_world]
    assert masses(aligned, 1) == pytest.approx({s_world: 0.6})
    assert aligned.targets.kind[1] == EXACT


def test_unicode_and_byte_fallback_tokens():
    teacher = byte_level([])
    student = sentencepiece([])
    t_bytes, s_bytes = vocab.token_bytes(teacher), vocab.token_bytes(student)
    e2 = student.convert_tokens_to_ids("<0xE2>")
    assert s_bytes[e2] == b"\xe2"
    assert t_bytes[teacher.convert_tokens_to_ids("â")] == b"\xe2"  # byte-level 0xE2
    assert (
        vocab.exact_map(t_bytes, vocab.bytes_index(s_bytes))[teacher.convert_tokens_to_ids("â")]
        == e2
    )
    text = "a☃é"  # a snowman (3 bytes) and é (2 bytes): byte tokens on both sides
    ids, top_ids, top_lp = teacher_row(teacher, text)
    aligned = Aligner(teacher, student, "gold", student.eos_token_id).align(
        ids, top_ids, top_lp, text
    )
    assert aligned.problem is None and student.decode(aligned.student_ids) == text
    # "▁" (the prefix space, always written), "a", the snowman's and é's bytes, the end of turn
    assert aligned.targets.kind[0] == MERGED and masses(aligned, 0) == {aligned.student_ids[0]: 1}
    assert (aligned.targets.kind[1:] == EXACT).all()
    assert [masses(aligned, j) for j in range(2, 5)] == [
        pytest.approx({student.convert_tokens_to_ids(f"<0x{b:02X}>"): 0.6}) for b in "☃".encode()
    ]


def test_groups_close_where_both_sides_agree():
    teacher = align.spans([2, 3, 1])  # "ab" "cde" "f"
    student = align.spans([1, 1, 3, 1])  # "a" "b" "cde" "f"
    assert align.groups(teacher, student) == [([0], [0, 1]), ([1], [2]), ([2], [3])]


def test_ids_that_do_not_spell_the_answer_are_uncovered_and_refused(tiny_tokenizers):
    t0, t1 = tiny_tokenizers
    ids, top_ids, top_lp = teacher_row(t0, "stone yellow")
    row = SimpleNamespace(token_ids=ids, top_ids=top_ids, top_logprobs=top_lp)
    coverage = measure(Aligner(t0, t1, "gold", 2), [(row, "STONE YELLOW")] * 3, "gold")
    assert coverage.covered == 0 and coverage.positions > 0
    with pytest.raises(Exception, match=r"only 0\.0% of .* --cross-tokenizer-min-coverage 0"):
        check(coverage, 0.5, "t0")
    check(coverage, 0.0, "t0")  # the override trains anyway
    assert Coverage("gold").record()["coverage"] == 0


def test_padding_slots_are_empty_buckets_and_uld_needs_no_ids():
    import torch

    from openkd.distill.kd import kd_terms

    torch.manual_seed(0)
    logits = torch.randn(2, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 4])
    ids = torch.tensor([[3, 7, 3], [4, 9, 4]])  # slot 2 pads (repeats the row's first id)
    logprobs = torch.tensor([[-0.5, -1.5, -float("inf")], [-0.4, -2.0, -float("inf")]])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    padded = kd_terms(logits, labels, ids, logprobs, valid=valid)
    plain = kd_terms(logits, labels, ids[:, :2], logprobs[:, :2])
    assert torch.allclose(padded.kl, plain.kl)  # the padding changes nothing
    uld = kd_terms(logits, labels, ids, logprobs, valid=valid, uld=torch.tensor([False, True]))
    assert torch.allclose(uld.kl[0], plain.kl[0]) and not torch.allclose(uld.kl[1], plain.kl[1])
    uld.kl.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
