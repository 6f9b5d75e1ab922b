"""Exact and near-duplicate detection against every earlier slice.

Exact: a 128-bit hash of the cleaned text. Near: MinHash (datasketch) over word 5-grams for English and
character 5-grams for Chinese, cut into LSH bands (datatrove's 14 x 8 by default); two documents that share any
band key are near-duplicates. Both kinds of keys live in indexed catalog tables, so a document is checked against
all history, not just its batch, and the lookup scales with PostgreSQL. Keys of the slice being built are written
in sorted bulk transactions as it goes (memory bounded by `DedupIndex.pending_keys`); they only count as history once
the slice commits, and keys left behind by a crashed run are removed before the next one starts.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, islice

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
    _MULTIPLIERS = np.array(
        [0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5, 0xB55A4F09],
        dtype=np.uint64,
    )

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

    def _unit_ids(self, units: list[str]) -> np.ndarray:
        """CRC32 of each unit; each distinct unit is hashed once (the cache is bounded: a long stream's
        vocabulary keeps growing), then one C-level pass maps every unit to its hash."""
        cache = self._unit_hash
        if len(cache) > 1_000_000:
            cache.clear()
        for u in set(units).difference(cache):
            cache[u] = zlib.crc32(u.encode())
        return np.fromiter(map(cache.__getitem__, units), dtype=np.uint64, count=len(units))

    def _grams(self, ids: np.ndarray, n: int) -> np.ndarray:
        """The 32-bit hash of every run of n consecutive units: sum of unit hash x multiplier, mod 2^32."""
        grams = np.zeros(max(0, len(ids) - n + 1), dtype=np.uint64)
        for k in range(n):  # products < 2^64; the sum wraps mod 2^64, which keeps it right mod 2^32
            grams += ids[k : len(ids) - n + 1 + k] * self._MULTIPLIERS[k]
        return grams & np.uint64(0xFFFFFFFF)

    def gram_hashes(self, docs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """The n-gram hashes of every document, back to back, and how many each has (at least one: the whole
        text when it is shorter than n, 0 for a text without units). Computed over the concatenated units of
        all documents at once; grams that would straddle two documents are never picked."""
        units = [self._units(text, lang) for text, lang in docs]
        ids = self._unit_ids(list(chain.from_iterable(units)))
        lens = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
        starts = np.cumsum(lens) - lens
        ns = np.array([self.ngram["zh" if lang == "zh" else "en"] for _, lang in docs], dtype=np.int64)
        counts = lens - ns + 1
        pools, pool_start, base = [], np.zeros(len(docs), dtype=np.int64), 0
        for n in np.unique(ns[counts > 0]).tolist():  # the usual case: one pass over all units per n-gram size
            use = (ns == n) & (counts > 0)
            pool_start[use] = base + starts[use]
            pools.append(self._grams(ids, n))
            base += len(pools[-1])
        for d in np.flatnonzero(counts <= 0).tolist():  # shorter than n: one gram of every unit (or 0 for none)
            pools.append(
                self._grams(ids[starts[d] : starts[d] + lens[d]], lens[d]) if lens[d] else np.zeros(1, dtype=np.uint64)
            )
            pool_start[d], counts[d] = base, 1
            base += 1
        first = np.cumsum(counts) - counts
        picks = np.repeat(pool_start - first, counts) + np.arange(counts.sum())
        return np.concatenate(pools)[picks], counts

    def shingle_hashes(self, text: str, lang: str) -> np.ndarray:
        """Distinct 32-bit hashes of the document's n-grams (the whole text when shorter than n)."""
        return np.unique(self.gram_hashes([(text, lang)])[0])

    def signatures(self, docs: list[tuple[str, str]]) -> np.ndarray:
        """MinHash signatures (D, bands * rows) of (text, lang) pairs, exactly what datasketch's
        `MinHash.update_batch` gives for each document alone, computed for the whole batch at once with numpy:
        datasketch's own pre-mix and permutations, one min-reduction per document (a repeated n-gram cannot
        change a minimum, so they are not removed first)."""
        from datasketch.minhash import _SCHEME_DTYPES, _SCHEME_WIDTHS, _fmix

        hashes, counts = self.gram_hashes(docs)
        dtype = _SCHEME_DTYPES[self.SCHEME]
        hv = _fmix(hashes.astype(dtype), _SCHEME_WIDTHS[self.SCHEME])
        starts = np.cumsum(counts) - counts
        a, b = self._proto.permutations
        out = np.empty((len(docs), len(a)), dtype=np.uint64)
        permuted = np.empty_like(hv)
        for j in range(len(a)):  # one permutation at a time: 1-D passes over cache-sized vectors, not an (N, P) matrix
            np.multiply(hv, a[j], out=permuted)
            permuted += b[j]  # wraps mod 2^width, as datasketch
            out[:, j] = np.minimum.reduceat(permuted, starts)
        return out

    def band_keys_many(self, docs: list[tuple[str, str]], chunk: int = 1024) -> list[list[int]]:
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
    """Checks candidates against history + the slice being built, and records the ones that are kept.

    Kept keys wait in memory (a sorted array of band keys, a set of hashes) until `pending_keys` of them have
    gathered, then go to the catalog in one transaction, sorted: random single inserts into the band-key index
    rewrite a page for nearly every key once the index outgrows SQLite's cache, sorted bulk inserts write each
    page once. Memory stays bounded by `pending_keys`; the verdicts are the same either way.
    """

    def __init__(self, catalog: Catalog, slice_id: str, pending_keys: int = 2_000_000):
        self.catalog, self.slice_id, self.pending_keys = catalog, slice_id, pending_keys
        self._keys = np.zeros(0, dtype=np.int64)  # sorted, distinct: kept band keys not yet in the catalog
        self._docs: dict[str, str] = {}  # hash -> lang of kept documents not yet in the catalog
        with catalog.session() as s:
            committed = select(Slice.id)
            # Keys of a slice that never committed (a crashed run) are not history.
            s.execute(delete(Document).where(Document.slice_id.not_in(committed)))
            s.execute(delete(MinhashBand).where(MinhashBand.slice_id.not_in(committed)))

    def check_and_add(self, candidates: list[Candidate]) -> list[str | None]:
        """For each candidate: `exact`, `near` or None (new: its keys are recorded for later candidates)."""
        hashes = {c.hash for c in candidates}
        keys = np.unique(np.fromiter((k for c in candidates for k in c.band_keys), dtype=np.int64))
        pending = _members(self._keys, keys)
        seen_hashes = hashes & self._docs.keys()
        with self.catalog.session() as s:
            conn = s.connection()
            seen_hashes |= _existing(conn, Document.hash, hashes - seen_hashes)
            seen_keys = set(keys[pending].tolist()) | _existing(conn, MinhashBand.band_key, keys[~pending].tolist())
        verdicts: list[str | None] = []
        new_keys: list[int] = []
        for c in candidates:
            if c.hash in seen_hashes:
                verdicts.append("exact")
            elif any(k in seen_keys for k in c.band_keys):
                verdicts.append("near")
            else:
                verdicts.append(None)
                self._docs[c.hash] = c.lang
                new_keys.extend(c.band_keys)
            # Later candidates of this batch are checked against the earlier ones too.
            seen_hashes.add(c.hash)
            seen_keys.update(c.band_keys)
        if new_keys:  # distinct: a kept document shares no key with anything seen before it
            new = np.unique(np.array(new_keys, dtype=np.int64))
            self._keys = np.insert(self._keys, np.searchsorted(self._keys, new), new)
        if len(self._keys) + 16 * len(self._docs) >= self.pending_keys:
            self.flush()
        return verdicts

    def flush(self) -> None:
        """Write the pending keys to the catalog (one transaction, in key order)."""
        if not len(self._keys) and not self._docs:
            return
        with self.catalog.session() as s:
            conn = s.connection()
            _insert_rows(
                conn,
                Document.__table__,
                ("hash", "slice_id", "lang"),
                ((h, self.slice_id, self._docs[h]) for h in sorted(self._docs)),
            )
            keys = chain.from_iterable(self._keys[i : i + 50_000].tolist() for i in range(0, len(self._keys), 50_000))
            _insert_rows(conn, MinhashBand.__table__, ("band_key", "slice_id"), ((k, self.slice_id) for k in keys))
        self._keys = np.zeros(0, dtype=np.int64)
        self._docs = {}


def _members(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in the sorted array."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


# The driver's own placeholder, where known: plain DB-API calls skip SQLAlchemy's per-value parameter processing,
# which costs more than SQLite's own insert or index lookup. Other drivers go through Core.
_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def _insert_rows(conn, table, columns: tuple[str, ...], rows: Iterable[tuple], chunk: int = 50_000) -> None:
    """Insert rows in chunks (a chunk of row tuples at a time in memory, however many rows there are)."""
    mark = _MARKS.get(conn.dialect.paramstyle)
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([mark or ''] * len(columns))})"
    rows = iter(rows)
    while part := list(islice(rows, chunk)):
        if mark is None:
            conn.execute(insert(table), [dict(zip(columns, r)) for r in part])
        else:
            conn.exec_driver_sql(sql, part)


def _existing(conn, column, values) -> set:
    """Which of `values` the column holds (in sorted chunks: neighbouring keys share index pages)."""
    found: set = set()
    ordered = sorted(values)
    mark = _MARKS.get(conn.dialect.paramstyle)
    for i in range(0, len(ordered), _LOOKUP_CHUNK):
        chunk = ordered[i : i + _LOOKUP_CHUNK]
        if mark is None:
            found.update(conn.scalars(select(column).where(column.in_(chunk))))
        else:
            sql = f"SELECT {column.name} FROM {column.table.name} WHERE {column.name} IN ({', '.join([mark] * len(chunk))})"
            found.update(row[0] for row in conn.exec_driver_sql(sql, tuple(chunk)))
    return found
