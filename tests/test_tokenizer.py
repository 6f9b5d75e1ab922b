"""The bilingual tokenizer keeps Chinese characters reusable: a repeated clause never becomes one opaque token."""

from __future__ import annotations

from wudao.data.tokenizer import train_tokenizer


def _pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text).ids]


def test_a_repeated_chinese_fact_is_characters_so_the_cloze_sees_the_same_tokens():
    corpus = ["阿联酋的首都是阿布扎比。", "芬兰的首都是赫尔辛基。", "The capital of Finland is Helsinki."] * 50
    tok = train_tokenizer(corpus, vocab_size=2000)
    # Before: GPT-2's pre-tokenizer kept the unspaced clause whole and BPE merged it into one id.
    assert _pieces(tok, "阿联酋的首都是阿布扎比") == list("阿联酋的首都是阿布扎比")
    prompt, answer = tok.encode("芬兰的首都是").ids, tok.encode("赫尔辛基").ids
    assert tok.encode("芬兰的首都是赫尔辛基").ids == prompt + answer, "a fact reads as its cloze prompt + its answer"
    assert _pieces(tok, "The capital of Finland is Helsinki.") == [
        "The",
        " capital",
        " of",
        " Finland",
        " is",
        " Helsinki",
        ".",
    ]
    for text in ("混合 mixed 文本, with 2024 numbers!", "日本語のテキスト", "阿联酋迪拉姆。"):
        assert tok.decode(tok.encode(text).ids) == text
