"""The bilingual byte-level BPE tokenizer (HF `tokenizers`): trained once, then frozen and versioned.

The version is a content hash of `tokenizer.json`, so a model and the data it was trained on can always be
checked to use the same one. The GLM and image-layout special tokens are reserved from the start, so later
objectives and modalities do not change the vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOS, CLS = "[PAD]", "[EOS]", "[CLS]"
MASK, SMASK, GMASK = "[MASK]", "[sMASK]", "[gMASK]"
SOP, EOP = "[sop]", "[eop]"
BOI, EOI, ROI, BASE = "[BOI]", "[EOI]", "[ROI]", "[BASE]"
SPECIAL_TOKENS = [PAD, EOS, CLS, MASK, SMASK, GMASK, SOP, EOP, BOI, EOI, ROI, BASE]


CJK_CHARACTER = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
"""Kana and Han characters: each one is its own pre-token (see `train_tokenizer`)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose Chinese (and Japanese) text is split into characters before BPE.

    GPT-2's pre-tokenizer splits on spaces, and Chinese has none: a whole clause is one pre-token, and on a corpus
    that repeats its phrasing BPE merges it into one token ("阿联酋的首都是阿布扎比" was a single id). A fact learned
    as one opaque id cannot be recalled from "阿联酋的首都是[MASK]", whose tokens differ, and a caption learned as one
    id says nothing about its colour words. One pre-token per character (as BERT-Chinese does) keeps every
    character a reusable token; BPE still merges a character's UTF-8 bytes, and Latin text is unchanged."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    # GLM's released tokenizer once mapped eop and gMASK to one id; make that impossible here.
    assert None not in ids and len(set(ids)) == len(ids), "special tokens must have distinct ids"
    return tok


def tokenizer_version(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def tokenizer_key(version: str) -> str:
    return f"tokenizer/{version}/tokenizer.json"


def load_tokenizer(data: bytes) -> Tokenizer:
    return Tokenizer.from_str(data.decode())
