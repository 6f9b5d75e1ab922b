"""Exact and near-duplicate detection against every earlier slice.

Exact: a 128-bit hash of the cleaned text. Near: MinHash (datasketch) over word 5-grams for English and
character 5-grams for Chinese, cut into LSH bands (datatrove's 14 x 8 by default); two documents that share any
band key are near-duplicates. Both kinds of keys live in indexed catalog tables, so a document is checked against
all history, not just its batch, and the lookup scales with PostgreSQL. Keys of the slice being built are written
as it goes (bounded memory); they only count as history once the slice commits, and keys left behind by a crashed
run are removed before the next one starts.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert, select

from wudao.catalog import Catalog, Document, MinhashBand, Slice

_WORDS = re.compile(r"\w+", re.UNICODE)
_ZH_CHARS = re.compile(r"[\w]", re.UNICODE)
_LOOKUP_CHUNK = 500  # keys per IN (...) query: well under SQLite's and PostgreSQL's parameter limits


def exact_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class MinHasher:
    """Band keys of a document's MinHash signature (one signed 64-bit key per band).

    Shingle hashes are computed in bulk with numpy: each word (or Chinese character) gets a stable CRC32, and an
    n-gram's 32-bit hash is a fixed linear combination of its units' hashes mod 2^32. datasketch then applies its
    permutations to those values. Band keys persist in the catalog, so every constant here (CRC32, the
    multipliers, datasketch's "affine32" scheme and seed) is pinned: changing one makes old keys incomparable.
    """

    SCHEME = "affine32"
    _MULTIPLIERS = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5, 0xB55A4F09],
                            dtype=np.uint64)  # fmt: skip

    def __init__(self, bands: int, rows: int, ngram_en: int, ngram_zh: int, seed: int = 1):
        from datasketch import MinHash

        if max(ngram_en, ngram_zh) > len(self._MULTIPLIERS):
            raise ValueError(f"n-grams up to {len(self._MULTIPLIERS)} are supported")
        self.bands, self.rows = bands, rows
        self.ngram = {"en": ngram_en, "zh": ngram_zh}
        self._proto = MinHash(num_perm=bands * rows, seed=seed, scheme=self.SCHEME)  # permutations drawn once, shared
        self._unit_hash: dict[str, int] = {}

    def _units(self, text: str, lang: str) -> list[str]:
        return _ZH_CHARS.findall(text.lower()) if lang == "zh" else _WORDS.findall(text.lower())

    def shingle_hashes(self, text: str, lang: str) -> np.ndarray:
        """Distinct 32-bit hashes of the document's n-grams (the whole text when shorter than n)."""
        cache = self._unit_hash
        if len(cache) > 1_000_000:  # bounded: the vocabulary of a long stream keeps growing
            cache.clear()
        units = self._units(text, lang)
        ids = np.fromiter((cache.get(u) or cache.setdefault(u, zlib.crc32(u.encode())) for u in units),
                          dtype=np.uint64, count=len(units))  # fmt: skip
        n = min(self.ngram[lang if lang == "zh" else "en"], max(1, len(ids)))
        if len(ids) == 0:
            return np.zeros(1, dtype=np.uint64)
        grams = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for k in range(n):
            grams = (grams + ids[k : len(ids) - n + 1 + k] * self._MULTIPLIERS[k]) & np.uint64(0xFFFFFFFF)
        return np.unique(grams)

    def signatures(self, docs: list[tuple[str, str]]) -> np.ndarray:
        """MinHash signatures (D, bands * rows) of (text, lang) pairs, exactly what datasketch's
        `MinHash.update_batch` gives for each document alone, computed for the whole batch in one numpy pass:
        datasketch's own pre-mix and permutations, one min-reduction per document."""
        from datasketch.minhash import _SCHEME_DTYPES, _SCHEME_WIDTHS, _fmix

        hashes = [self.shingle_hashes(text, lang) for text, lang in docs]
        offsets = np.cumsum([0] + [len(h) for h in hashes[:-1]])
        hv = np.concatenate(hashes).astype(_SCHEME_DTYPES[self.SCHEME]).reshape(-1, 1)
        a, b = self._proto.permutations
        permuted = _fmix(hv, _SCHEME_WIDTHS[self.SCHEME]) * a + b  # (N shingles, P): wraps mod 2^width, as datasketch
        return np.minimum.reduceat(permuted, offsets, axis=0).astype(np.uint64)

    def band_keys_many(self, docs: list[tuple[str, str]], chunk: int = 256) -> list[list[int]]:
        """One signed 64-bit key per band and document (the band's rows mixed into 64 bits, then the band index)."""
        out: list[list[int]] = []
        for i in range(0, len(docs), chunk):
            sig = self.signatures(docs[i : i + chunk]).reshape(-1, self.bands, self.rows)
            key = np.zeros(sig.shape[:2], dtype=np.uint64)
            for r in range(self.rows):
                key = _mix64(key ^ sig[:, :, r])
            key = _mix64(key ^ np.arange(1, self.bands + 1, dtype=np.uint64))
            out.extend(key.view(np.int64).tolist())
        return out

    def band_keys(self, text: str, lang: str) -> list[int]:
        return self.band_keys_many([(text, lang)])[0]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijection that spreads every input bit over the output."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class Candidate:
    hash: str
    band_keys: list[int]
    lang: str


class DedupIndex:
    """Checks candidates against history + the slice being built, and records the ones that are kept."""

    def __init__(self, catalog: Catalog, slice_id: str):
        self.catalog, self.slice_id = catalog, slice_id
        with catalog.session() as s:
            committed = select(Slice.id)
            # Keys of a slice that never committed (a crashed run) are not history.
            s.execute(delete(Document).where(Document.slice_id.not_in(committed)))
            s.execute(delete(MinhashBand).where(MinhashBand.slice_id.not_in(committed)))

    def check_and_add(self, candidates: list[Candidate]) -> list[str | None]:
        """For each candidate: `exact`, `near` or None (new: its keys are recorded for later candidates)."""
        hashes = {c.hash for c in candidates}
        keys = {k for c in candidates for k in c.band_keys}
        with self.catalog.session() as s:
            seen_hashes = _existing(s, Document.hash, hashes)
            seen_keys = _existing(s, MinhashBand.band_key, keys)
        verdicts: list[str | None] = []
        new_docs, new_bands = [], []
        for c in candidates:
            if c.hash in seen_hashes:
                verdicts.append("exact")
            elif any(k in seen_keys for k in c.band_keys):
                verdicts.append("near")
            else:
                verdicts.append(None)
                new_docs.append({"hash": c.hash, "slice_id": self.slice_id, "lang": c.lang})
                new_bands.extend({"band_key": k, "slice_id": self.slice_id} for k in set(c.band_keys))
            # Later candidates of this batch are checked against the earlier ones too.
            seen_hashes.add(c.hash)
            seen_keys.update(c.band_keys)
        with self.catalog.session() as s:
            conn = s.connection()  # Core executemany: the ORM's bulk path costs more than the insert itself
            if new_docs:
                conn.execute(insert(Document.__table__), new_docs)
            if new_bands:
                conn.execute(insert(MinhashBand.__table__), new_bands)
        return verdicts


def _existing(session, column, values: set) -> set:
    found: set = set()
    ordered = sorted(values)
    for i in range(0, len(ordered), _LOOKUP_CHUNK):
        chunk = ordered[i : i + _LOOKUP_CHUNK]
        found.update(session.scalars(select(column).where(column.in_(chunk))))
    return found
