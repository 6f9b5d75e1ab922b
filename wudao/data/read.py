"""The map side of ingest: read, clean, language-tag, PII-scrub, hash, MinHash and tokenize one batch of work items.

A pure function of (work items, source store, settings, tokenizer): no catalog and no platform store, so it runs
wherever the work is sent: in the ingesting process, in worker processes (`ingest.workers`), or as a Prefect task
on a Dask or Ray cluster. What it returns is compact: for each kept document its content hash, MinHash band keys,
language and token ids (a numpy array, 2-4 bytes a token), never the text, once the slice's tokenizer exists.
Only the first slice, whose tokenizer is trained on its own first documents, ships texts back to be tokenized.
The reduce side (`wudao.data.slice_builder`) then only deduplicates against history, writes shards and commits.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np

from wudao.config import IngestSettings
from wudao.data.clean import Cleaner
from wudao.data.dedup import MinHasher, exact_hash
from wudao.data.formats import ImageRecord, TextRecord, WorkItem, read_image_item, read_text_item
from wudao.data.images import ImageRejected, normalize_image
from wudao.data.quarantine import Reason, Rejected
from wudao.data.shards import token_dtype
from wudao.data.tokenizer import load_tokenizer
from wudao.storage import ObjectStore

CHUNK_RECORDS = 1024
"""Records per part: the unit of batched language id, MinHash and tokenization, and what the reduce side holds."""


@dataclass
class KeptTexts:
    """The documents of one part that passed cleaning, column by column, in reading order."""

    hashes: list[str] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    band_keys: list[list[int]] = field(default_factory=list)
    texts: list[str] | None = None
    """The cleaned texts; shipped only while the slice has no tokenizer yet (the first slice trains it)."""
    tokens: np.ndarray | None = None
    """Token ids of every document back to back (no EOS), when the tokenizer was known."""
    lengths: np.ndarray | None = None
    """Tokens of each document (int64), so `tokens` splits back into documents."""

    def __len__(self) -> int:
        return len(self.hashes)

    def token_ids(self) -> Iterator[np.ndarray]:
        """Each document's token ids (views into `tokens`)."""
        ends = np.cumsum(self.lengths)
        for start, end in zip((ends - self.lengths).tolist(), ends.tolist()):
            yield self.tokens[start:end]


@dataclass
class KeptImage:
    key: str
    png: bytes
    captions: list[str]
    hash: str


@dataclass
class Part:
    """What about `CHUNK_RECORDS` records of a batch leave after reading and cleaning."""

    texts: KeptTexts = field(default_factory=KeptTexts)
    images: list[KeptImage] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    low_quality_rules: Counter = field(default_factory=Counter)


def read_batch(
    items: list[WorkItem],
    source_store: ObjectStore,
    settings: IngestSettings,
    tokenizer_json: str | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> list[Part]:
    """A whole batch's parts: what a worker process or a Prefect task returns (memory bounded by the batch)."""
    return list(read_parts(items, source_store, settings, tokenizer_json, chunk_records))


def read_parts(
    items: list[WorkItem],
    source_store: ObjectStore,
    settings: IngestSettings,
    tokenizer_json: str | None = None,
    chunk_records: int = CHUNK_RECORDS,
) -> Iterator[Part]:
    """A batch's parts one at a time, so a consumer that reduces as it goes holds one part however large the objects
    are. The parts (their boundaries included) depend only on the items and settings, never on where they are
    read: that is what makes one worker and many give the same slice."""
    cleaner = Cleaner.shared(settings.clean)
    hasher = MinHasher(
        settings.minhash_bands, settings.minhash_rows, settings.minhash_ngram_en, settings.minhash_ngram_zh
    )
    tok = _tokenizer(tokenizer_json) if tokenizer_json else None
    out = Part()
    records: list[TextRecord] = []

    def clean_records() -> None:
        kept = []
        for rec, cleaned in zip(records, cleaner.clean_many([r.text for r in records])):
            if cleaned.rejected:
                reason = Reason.EMPTY if cleaned.rejected == "empty" else Reason.LOW_QUALITY
                out.rejected.append(Rejected(rec.key, rec.record, reason, cleaned.rejected))
                out.low_quality_rules[cleaned.rejected] += reason == Reason.LOW_QUALITY
            else:
                kept.append(cleaned)
        if kept:  # MinHash (and tokenization) for the whole chunk at once
            _keep(out.texts, [c.text for c in kept], [c.lang for c in kept], hasher, tok)
        records.clear()

    for item in items:
        if item.kind == "text":
            for rec in read_text_item(source_store, item, settings.max_document_bytes):
                if isinstance(rec, Rejected):
                    out.rejected.append(rec)
                    continue
                records.append(rec)
                if len(records) >= chunk_records:  # batched language id; then hand the chunk over
                    clean_records()
                    yield out
                    out = Part()
            clean_records()
        elif item.kind in ("pair", "coco"):
            rec = read_image_item(source_store, item, settings.max_document_bytes)
            if isinstance(rec, Rejected):
                out.rejected.append(rec)
                continue
            image = _clean_image(rec, settings, cleaner, out)
            if image is not None:
                out.images.append(image)
        if len(out.texts) + len(out.images) >= chunk_records:
            yield out
            out = Part()
    yield out


def _keep(kept: KeptTexts, texts: list[str], langs: list[str], hasher: MinHasher, tok) -> None:
    """Append cleaned documents to `kept`: hashes, band keys, and token ids (or the texts, without a tokenizer)."""
    kept.hashes += [exact_hash(t) for t in texts]
    kept.langs += langs
    kept.band_keys += hasher.band_keys_many(list(zip(texts, langs)))
    if tok is None:
        kept.texts = (kept.texts or []) + texts
        return
    ids, lengths = encode(tok, texts)
    kept.tokens = ids if kept.tokens is None else np.concatenate([kept.tokens, ids])
    kept.lengths = lengths if kept.lengths is None else np.concatenate([kept.lengths, lengths])


def encode(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` back to back in one array of the vocabulary's dtype, and each text's length."""
    ids = [e.ids for e in tok.encode_batch(texts)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=token_dtype(tok.get_vocab_size()), count=int(lengths.sum()))
    return flat, lengths


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    """Parsed once per process and tokenizer (every task of an ingest carries the same one)."""
    return load_tokenizer(tokenizer_json.encode())


def _clean_image(rec: ImageRecord, settings: IngestSettings, cleaner: Cleaner, out: Part) -> KeptImage | None:
    try:
        png = normalize_image(rec.data, settings.image_size, settings.image_max_pixels)
    except ImageRejected as e:
        out.rejected.append(Rejected(rec.key, None, e.reason, str(e)))
        return None
    captions = []
    for caption in rec.captions:
        cleaned = cleaner.normalize_caption(caption)
        if cleaned:
            captions.append(cleaned)
    if not captions:
        out.rejected.append(Rejected(rec.key, None, Reason.MISSING_CAPTION, "every caption was empty after cleaning"))
        return None
    return KeptImage(rec.key, png, captions, hashlib.blake2b(rec.data, digest_size=16).hexdigest())
