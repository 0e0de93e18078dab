"""Tests for the text frontend: normalization, tokenizer, tokenizer training, segmentation, bucketing, errors."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from engine_ref.errors import InputError, ModelFilesError
from engine_ref.text import Segment, TextFrontend, default_corpus, normalize, pretokenize
from engine_ref.text.normalize import (
    detect_language,
    en_cardinal,
    en_ordinal,
    expand_contractions,
    respell_pinyin,
    rewrite_punctuation,
    zh_cardinal,
)
from engine_ref.text.segment import bucket_by_length, split_segments
from engine_ref.text.tokenizer import BpeTokenizer, join_cjk, train_bpe


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(default_corpus(), tmp_path_factory.mktemp("bpe") / "small.model", 500)


@pytest.fixture(scope="module")
def full_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As many pieces as the embedded corpus supports: every character of the corpus is known."""
    return train_bpe(default_corpus(), tmp_path_factory.mktemp("bpe") / "full.model", 12000)


# --------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (99, "ninety nine"), (100, "one hundred"),
    (101, "one hundred one"), (1024, "one thousand twenty four"), (20_000, "twenty thousand"),
    (1_000_001, "one million one"), (-5, "minus five"),
])
def test_en_cardinal(n: int, words: str) -> None:
    assert en_cardinal(n) == words


@pytest.mark.parametrize("n, words", [(1, "first"), (2, "second"), (3, "third"), (12, "twelfth"),
                                      (21, "twenty first"), (40, "fortieth"), (100, "one hundredth")])
def test_en_ordinal(n: int, words: str) -> None:
    assert en_ordinal(n) == words


@pytest.mark.parametrize("n, words", [
    (0, "零"), (10, "十"), (15, "十五"), (20, "二十"), (101, "一百零一"), (110, "一百一十"), (1010, "一千零一十"),
    (1024, "一千零二十四"), (10_005, "一万零五"), (12_999, "一万二千九百九十九"), (100_000, "十万"),
    (3_150_000, "三百一十五万"), (100_000_000, "一亿"), (100_010_000, "一亿零一万"), (-3, "负三"),
])
def test_zh_cardinal(n: int, words: str) -> None:
    assert zh_cardinal(n) == words


# --------------------------------------------------------------------------------------------- normalization
@pytest.mark.parametrize("text, lang", [
    ("I love you!", "en"), ("我爱你", "zh"), ("今天是个好日子 it's a good day", "zh"), ("12345", "zh"),
    ("user@example.com", "zh"), ("the character is read xing2", "zh"), ("have you ever been to beta2?", "en"),
])
def test_language_detection(text: str, lang: str) -> None:
    assert detect_language(text) == lang


@pytest.mark.parametrize("text, expected", [
    ("I have 3 apples and 12 pears.", "I have three apples and twelve pears."),
    ("Prices rose 2.5% in 2024.", "Prices rose two point five percent in two thousand twenty four."),
    ("It costs $12.50 today", "It costs twelve dollars fifty cents today"),
    ("It costs $1", "It costs one dollar"),
    ("the 21st century, the 2nd floor", "the twenty first century, the second floor"),
    ("a crowd of 1,500 people", "a crowd of one thousand five hundred people"),
    ("See you at 8:00 AM", "See you at eight AM"),
    ("we met at 7:05", "we met at seven oh five"),
    ("F5-TTS and CosyVoice2", "F five-TTS and CosyVoice two"),
    ("it was -5 outside", "it was minus five outside"),
    ("agent 007", "agent zero zero seven"),
])
def test_english_numbers(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("共465篇", "共四百六十五篇"),
    ("2002年的第一场雪", "二零零二年的第一场雪"),
    ("2025年01月11日", "二零二五年一月十一日"),
    ("现在是20:00", "现在是二十点"),
    ("8:05出发", "八点零五分出发"),
    ("增长了23.5%", "增长了百分之二十三点五"),
    ("速度是10km/h", "速度是十千米每小时"),
    ("售价¥12999", "售价一万二千九百九十九元"),
    ("于2030/1/2发布", "于二零三零年一月二日发布"),
    ("1键3连", "一键三连"),
    ("电话138-0013-8000", "电话一三八-零零一三-八零零零"),
    ("气温-3度", "气温负三度"),
    ("１２个", "十二个"),
])
def test_chinese_numbers(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_punctuation_map() -> None:
    assert normalize("你好，世界！真的吗？是的。") == "你好,世界!真的吗?是的."
    assert normalize("“我爱你”的英语是“I love you”") == "'我爱你'的英语是'I love you'"
    assert normalize("书名《安静的花园》（新版）") == "书名'安静的花园''新版'"
    assert normalize("时间：早上；地点、公园") == "时间,早上,地点,公园"
    assert normalize("这酒……有毒...") == "这酒…有毒…"
    assert normalize("克里斯托弗·诺兰") == "克里斯托弗-诺兰"
    assert normalize("He said: \"wait (please)\"; then left") == "He said, 'wait 'please'', then left"
    # The map is one ordered alternation: a single full-width comma key wins over the triple-comma key.
    assert rewrite_punctuation("a，，，b", "en") == "a,,,b"
    assert rewrite_punctuation("a,,,b", "en") == "a…b"
    assert rewrite_punctuation("5$", "zh") == "5." and rewrite_punctuation("5$", "en") == "5$"


def test_contractions() -> None:
    assert expand_contractions("Where's the money? It's here, that's it.") == \
        "Where is the money? It is here, that is it."
    assert normalize("今天是个好日子 it's a good day") == "今天是个好日子 it is a good day"
    # Only the listed words are expanded; possessives and other contractions stay.
    assert expand_contractions("John's car isn't here") == "John's car isn't here"


def test_pinyin_is_protected_and_respelled() -> None:
    assert normalize("晕xuan4是一种gan3觉") == "晕XVAN4是一种gan3觉"
    # Every j/q/x syllable is upper-cased, respelled or not (upstream does the same).
    assert normalize("“学习”读作xue2 xi2，有3个字") == "'学习'读作XVE2 XI2,有三个字"
    assert respell_pinyin("ju4") == "JV4"
    assert respell_pinyin("qun2") == "QVN2"
    assert respell_pinyin("jiang1") == "JIANG1"
    assert respell_pinyin("zhong4") == "zhong4"
    # beta1 / voice2 are not pinyin: their digits are verbalized.
    assert normalize("用beta1测试") == "用beta一测试"


def test_whitespace_cleanup() -> None:
    assert normalize("  hello \n\n  world\t ") == "hello world"
    assert normalize("   ") == ""


def test_pretokenize_spaces_cjk_and_upper_cases() -> None:
    assert pretokenize("你好世界是 hello world 的中文") == "你 好 世 界 是 HELLO WORLD 的 中 文"
    assert pretokenize("  mixed文字and MORE  ") == "MIXED 文 字 AND MORE"
    assert pretokenize("こんにちは") == "こ ん に ち は"
    assert join_cjk("你 好 世 界 是 HELLO WORLD 的 中 文") == "你好世界是 HELLO WORLD 的中文"


# ------------------------------------------------------------------------------------------------- tokenizer
def test_train_bpe_is_deterministic(tmp_path: Path) -> None:
    corpus = default_corpus()
    first = train_bpe(corpus, tmp_path / "a" / "bpe.model", 400, seed=0)
    second = train_bpe(corpus, tmp_path / "b" / "bpe.model", 400, seed=0)
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("requested", [300, 500, 1000])
def test_train_bpe_vocab_size(tmp_path: Path, requested: int) -> None:
    tok = BpeTokenizer(train_bpe(default_corpus(), tmp_path / "bpe.model", requested))
    assert requested * 0.9 <= tok.vocab_size <= requested


def test_train_bpe_soft_limit_on_small_corpus(full_bpe: Path) -> None:
    tok = BpeTokenizer(full_bpe)
    assert 1000 < tok.vocab_size < 12000  # the corpus cannot fill 12000 pieces; training still succeeds


def test_special_piece_ids(small_bpe: Path) -> None:
    tok = BpeTokenizer(small_bpe)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<s>", "</s>", "<unk>"]
    assert tok.unk_id == 2


def test_tokenizer_round_trip(full_bpe: Path) -> None:
    tok = BpeTokenizer(full_bpe)
    for raw in ["The lamp turns once every 20 seconds.", "今天的天气很好，我们去公园散步！",
                "这本书的 English title 是 The Quiet Garden."]:
        text = normalize(raw)
        pieces = tok.encode(text)
        assert tok.unk_id not in [p.id for p in pieces]
        assert [p.piece for p in pieces] == tok.encode_pieces(text)
        assert all(tok.piece_to_id(p.piece) == p.id for p in pieces)
        decoded = tok.decode([p.id for p in pieces])
        assert decoded.replace(" ", "") == text.upper().replace(" ", "")
        assert tok.decode([p.id for p in pieces], lower_case=True).replace(" ", "") == text.lower().replace(" ", "")
    assert tok.encode_pieces("hello")[-1] != "<unk>"  # lower-case input is upper-cased before encoding


def test_unknown_characters_keep_their_surface(small_bpe: Path) -> None:
    tok = BpeTokenizer(small_bpe)
    pieces = tok.encode("🙂 HI")
    assert ("🙂", tok.unk_id) in [(p.piece, p.id) for p in pieces]
    assert tok.piece_to_id("🙂") == tok.unk_id


def test_missing_or_corrupt_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="does not exist"):
        BpeTokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bpe.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ModelFilesError, match="not a valid SentencePiece model") as err:
        BpeTokenizer(bad)
    assert str(bad) in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(ModelFilesError):
        TextFrontend(tmp_path / "missing" / "bpe.model")


def test_vocabulary_must_fit_the_text_embedding(small_bpe: Path) -> None:
    size = BpeTokenizer(small_bpe).vocab_size
    assert TextFrontend(small_bpe, number_text_tokens=size).tokenizer.vocab_size == size
    with pytest.raises(ModelFilesError, match="number_text_tokens"):
        TextFrontend(small_bpe, number_text_tokens=size - 1)


# ---------------------------------------------------------------------------------------------- segmentation
def _lens(segments: list[list[str]]) -> list[int]:
    return [len(s) for s in segments]


def test_split_on_sentence_ends() -> None:
    pieces = ["A", "B", ".", "C", "D", "\u2581?", "E", "F", "!"]
    assert split_segments(pieces, 3) == [["A", "B", "."], ["C", "D", "\u2581?"], ["E", "F", "!"]]
    # Neighbours merge greedily while they fit.
    assert split_segments(pieces, 6) == [["A", "B", ".", "C", "D", "\u2581?"], ["E", "F", "!"]]
    assert split_segments(pieces, 100) == [pieces]


def test_split_needs_more_than_two_pieces_before_an_end(caplog: pytest.LogCaptureFixture) -> None:
    # "A ." is too short to close a sentence, so the run continues and has to be cut at the limit.
    with caplog.at_level(logging.WARNING, logger="engine_ref.text"):
        assert split_segments(["A", ".", "B", "C", "D", "."], 4) == [["A", ".", "B", "C"], ["D", "."]]


def test_split_falls_back_to_commas() -> None:
    pieces = ["A", "B", ",", "C", "D", "\u2581,", "E", "F", "."]
    assert split_segments(pieces, 5) == [["A", "B", ","], ["C", "D", "\u2581,"], ["E", "F", "."]]


def test_split_falls_back_to_hyphens() -> None:
    pieces = ["A", "B", "-", "C", "D", "-", "E", "F", "."]
    assert split_segments(pieces, 5) == [["A", "B", "-"], ["C", "D", "-"], ["E", "F", "."]]


def test_split_hard_chunks_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    pieces = list("abcdefghij")
    with caplog.at_level(logging.WARNING, logger="engine_ref.text"):
        segments = split_segments(pieces, 4)
    assert segments == [list("abcd"), ["e"], list("fghi"), ["j"]]
    assert any("chunks of 4" in r.getMessage() and r.name == "engine_ref.text" for r in caplog.records)


def test_closing_quote_stays_with_its_sentence() -> None:
    pieces = ["A", "B", ".", "'", "C", "D", "."]
    assert split_segments(pieces, 4) == [["A", "B", ".", "'"], ["C", "D", "."]]
    # Upstream's loop slip emits the quote twice; available for exact parity.
    assert split_segments(pieces, 4, duplicate_closing_quote=True) == [["A", "B", ".", "'"], ["'", "C", "D", "."]]
    # A full segment leaves the quote to the next one (the limit wins); upstream's duplicate would exceed it.
    tight = ["A", "B", ".", "\u2581'", "C", "."]
    assert split_segments(tight, 3) == [["A", "B", "."], ["\u2581'", "C", "."]]
    assert _lens(split_segments(tight, 3, duplicate_closing_quote=True)) == [4, 3]


def test_split_never_goes_back_to_stronger_split_points(caplog: pytest.LogCaptureFixture) -> None:
    # Comma and hyphen both sit in the first two pieces, so neither can split; upstream recursed forever here.
    with caplog.at_level(logging.WARNING, logger="engine_ref.text"):
        assert split_segments([",", "-", "A", "B", "C"], 4) == [[",", "-", "A", "B"], ["C"]]


def test_split_invariants_on_random_input() -> None:
    rng = random.Random(1234)
    vocab = ["W", "X", "\u2581Y", ".", "!", "?", "\u2581.", "\u2581...", ",", "\u2581,", "-", "'", "\u2581'"]
    for _ in range(300):
        pieces = [rng.choice(vocab) for _ in range(rng.randint(0, 80))]
        limit = rng.randint(1, 15)
        segments = split_segments(pieces, limit)
        assert all(0 < len(s) <= limit for s in segments)
        assert [p for s in segments for p in s] == pieces  # nothing dropped, nothing repeated, order kept
    with pytest.raises(ValueError):
        split_segments(["A"], 0)


# ------------------------------------------------------------------------------------------------- bucketing
def test_bucket_small_input_is_one_bucket_in_order() -> None:
    assert bucket_by_length([5, 1, 3], 4) == [[0, 1, 2]]
    assert bucket_by_length([], 4) == []


def test_bucket_rules_by_hand() -> None:
    # Sorted: 10, 11, 12 share a bucket (below 1.5 x median 11); 30 starts one; 31 joins; 100 is alone and is
    # folded into the first bucket with room.
    assert bucket_by_length([10, 11, 12, 30, 31, 100], 4) == [[0, 1, 2, 5], [3, 4]]
    # Full buckets force new ones.
    assert bucket_by_length([1, 1, 1, 1, 1, 1, 1, 1], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Size 1 (CPU): one segment per bucket, shortest first.
    assert bucket_by_length([3, 1, 2], 1) == [[1], [2], [0]]


def test_bucket_invariants_on_random_input() -> None:
    rng = random.Random(99)
    for _ in range(300):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(0, 40))]
        size = rng.randint(1, 6)
        buckets = bucket_by_length(lengths, size)
        flat = [i for b in buckets for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(0 < len(b) <= size for b in buckets)
    with pytest.raises(ValueError):
        bucket_by_length([1, 2], 0)


# -------------------------------------------------------------------------------------------------- frontend
def test_prepare_segments(full_bpe: Path) -> None:
    frontend = TextFrontend(full_bpe)
    text = default_corpus()[:4000]
    segments = frontend.prepare(text, max_text_tokens_per_segment=60)
    assert len(segments) > 5
    assert [s.index for s in segments] == list(range(len(segments)))
    assert all(isinstance(s, Segment) and 0 < len(s) <= 60 for s in segments)
    tok = frontend.tokenizer
    all_pieces = [p.piece for p in tok.encode(normalize(text))]
    assert [p for s in segments for p in s.pieces] == all_pieces
    for s in segments:
        assert s.token_ids == tuple(tok.piece_to_id(p) for p in s.pieces)
        assert 0 not in s.token_ids and 1 not in s.token_ids
    assert segments[0].text.startswith("THE LIGHTHOUSE KEEPER'S NOTEBOOK")


def test_prepare_drops_start_and_stop_ids(full_bpe: Path) -> None:
    tok = BpeTokenizer(full_bpe)
    word_boundary = tok.piece_to_id("\u2581")
    frontend = TextFrontend(full_bpe, start_text_token=word_boundary, stop_text_token=tok.piece_to_id("."))
    segments = frontend.prepare("你好。我们去公园。")
    ids = [i for s in segments for i in s.token_ids]
    assert ids and word_boundary not in ids and tok.piece_to_id(".") not in ids


def test_frontend_bucket_restores_order(full_bpe: Path) -> None:
    frontend = TextFrontend(full_bpe)
    segments = frontend.prepare(default_corpus()[:6000], max_text_tokens_per_segment=40)
    buckets = frontend.bucket(segments, max_bucket_size=3)
    flat = [s for b in buckets for s in b]
    assert sorted(flat, key=lambda s: s.index) == segments
    assert all(len(b) <= 3 for b in buckets)


@pytest.mark.parametrize("text, problem", [
    ("", "empty"), ("   \n\t", "empty"), ("!!! ...", "nothing speakable"), ("😀🎉", "nothing speakable"),
    ("。，！？", "nothing speakable"), (None, "must be a string"), (b"bytes", "must be a string"),
])
def test_bad_text_raises_input_error(small_bpe: Path, text: object, problem: str) -> None:
    with pytest.raises(InputError, match=problem) as err:
        TextFrontend(small_bpe).prepare(text)  # type: ignore[arg-type]
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("limit", [0, -3, 1.5, True, "120"])
def test_bad_segment_limit_raises_input_error(small_bpe: Path, limit: object) -> None:
    with pytest.raises(InputError, match="max_text_tokens_per_segment"):
        TextFrontend(small_bpe).prepare("hello world", limit)  # type: ignore[arg-type]


def test_limits_raise_input_error(small_bpe: Path) -> None:
    frontend = TextFrontend(small_bpe, max_text_chars=50)
    with pytest.raises(InputError, match="limit of 50"):
        frontend.prepare("word " * 20)
    with pytest.raises(InputError, match="max_bucket_size"):
        frontend.bucket([], 0)


def test_unknown_characters_are_kept_and_logged(small_bpe: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine_ref.text"):
        segments = TextFrontend(small_bpe).prepare("HELLO 🙂 WORLD")
    ids = [i for s in segments for i in s.token_ids]
    assert ids.count(2) == 1
    assert any("unknown" in r.getMessage() for r in caplog.records)
