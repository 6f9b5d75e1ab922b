"""The batched MinHash equals datasketch's own per-document MinHash, and band keys behave as LSH keys."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash

from wudao.data.dedup import MinHasher


def test_batched_signatures_equal_datasketch_per_document():
    rng = random.Random(0)
    words = "the river flows under an old stone bridge while children play near the market square".split()
    docs = [(" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))), "en") for _ in range(40)]
    docs += [("".join(chr(0x4E00 + rng.randrange(300)) for _ in range(rng.randint(2, 80))), "zh") for _ in range(40)]
    hasher = MinHasher(14, 8, 5, 5)
    batched = hasher.signatures(docs)
    for (text, lang), row in zip(docs, batched):
        reference = MinHash(
            num_perm=112, permutations=hasher._proto.permutations, scheme=MinHasher.SCHEME, hashfunc=int
        )
        reference.update_batch(hasher.shingle_hashes(text, lang).tolist())
        assert np.array_equal(reference.hashvalues.astype(np.uint64), row)


def test_band_keys_find_near_duplicates_not_strangers():
    hasher = MinHasher(14, 8, 5, 5)
    base = " ".join(f"word{i}" for i in range(120))
    near = base.replace("word60", "changed")
    other = " ".join(f"term{i}" for i in range(120))
    a, b, c = hasher.band_keys_many([(base, "en"), (near, "en"), (other, "en")])
    assert set(a) & set(b), "one changed word in 120 shares bands"
    assert not set(a) & set(c)
    assert a == hasher.band_keys(base, "en"), "the same text always gives the same keys"


def _per_unit_shingle_hashes(hasher: MinHasher, text: str, lang: str) -> np.ndarray:
    """The original one-document-at-a-time shingle hashing (CRC32 per unit, n-gram by n-gram): band keys already
    in catalogs were made with it, so the chunked version must give the same values."""
    import zlib

    units = hasher._units(text, lang)
    ids = np.array([zlib.crc32(u.encode()) for u in units], dtype=np.uint64)
    n = min(hasher.ngram[lang if lang == "zh" else "en"], max(1, len(ids)))
    if len(ids) == 0:
        return np.zeros(1, dtype=np.uint64)
    grams = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        grams = (grams + ids[k : len(ids) - n + 1 + k] * MinHasher._MULTIPLIERS[k]) & np.uint64(0xFFFFFFFF)
    return np.unique(grams)


def test_chunked_gram_hashes_equal_the_per_unit_hashes():
    rng = random.Random(1)
    words = "alpha beta gamma delta the of naïve Straße 北京 x".split()
    docs = [("", "en"), ("!!!", "zh"), ("one", "en"), ("两个字", "zh"), ("one two three four", "en")]
    docs += [
        (" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))), rng.choice(["en", "other"])) for _ in range(60)
    ]
    docs += [("".join(chr(0x4E00 + rng.randrange(50)) for _ in range(rng.randint(0, 30))), "zh") for _ in range(60)]
    rng.shuffle(docs)
    for hasher in (MinHasher(14, 8, 5, 5), MinHasher(14, 8, 5, 3)):
        values, counts = hasher.gram_hashes(docs)
        assert len(counts) == len(docs) and counts.sum() == len(values)
        for (text, lang), part in zip(docs, np.split(values, np.cumsum(counts)[:-1])):
            assert np.array_equal(np.unique(part), _per_unit_shingle_hashes(hasher, text, lang)), (text, lang)
        # Chunked signatures equal one document at a time.
        together = hasher.signatures(docs)
        alone = np.vstack([hasher.signatures([d]) for d in docs])
        assert np.array_equal(together, alone)


def test_band_keys_are_pinned():
    """Persisted band keys must never drift: a change here makes every catalog's history incomparable."""
    hasher = MinHasher(14, 8, 5, 5)
    docs = [
        ("the river flows under an old stone bridge while children play", "en"),
        ("北京是中国的首都，也是一座历史悠久的城市。", "zh"),
    ]
    keys = hasher.band_keys_many(docs)
    # Computed by the per-document implementation the first catalogs were built with.
    assert [k[:2] for k in keys] == [
        [-1291603263120616020, 8455969656974064191],
        [300981527988985950, 6124837224900772348],
    ]


def test_pending_keys_written_early_or_late_give_the_same_verdicts(tmp_path):
    """Kept keys wait in memory and go to the catalog in sorted bulk writes; when they go changes no verdict."""
    from sqlalchemy import func, select

    from wudao.catalog import Catalog, Document, MinhashBand
    from wudao.data.dedup import Candidate, DedupIndex

    rng = random.Random(2)
    pool = [rng.getrandbits(63) for _ in range(400)]
    batches = [
        [Candidate(f"{rng.randrange(150):032x}", rng.sample(pool, 3), "en") for _ in range(40)] for _ in range(6)
    ]
    results = []
    for n, pending in enumerate((10**9, 50, 1)):
        catalog = Catalog(f"sqlite:///{tmp_path}/c{n}.db")
        index = DedupIndex(catalog, "slice-00001", pending_keys=pending)
        results.append([index.check_and_add(batch) for batch in batches])
        index.flush()
        with catalog.session() as s:
            results[-1].append(
                (
                    s.scalar(select(func.count()).select_from(Document)),
                    s.scalar(select(func.count()).select_from(MinhashBand)),
                )
            )
        catalog.close()
    assert results[0] == results[1] == results[2]
    kept = sum(v is None for batch in results[0][:-1] for v in batch)
    assert results[0][-1][0] == kept and 0 < kept < 240
    assert any(v == "exact" for b in results[0][:-1] for v in b) and any(
        v == "near" for b in results[0][:-1] for v in b
    )
