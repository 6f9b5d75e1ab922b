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
        reference = MinHash(num_perm=112, permutations=hasher._proto.permutations, scheme=MinHasher.SCHEME, hashfunc=int)
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
