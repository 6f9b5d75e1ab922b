"""The reduce side of ingest: parts in listing order -> deduplicated against all history, held out by hash,
written into shards, and committed as one slice.

It never reads or cleans: parts arrive already hashed, MinHashed and (once the slice's tokenizer exists) tokenized,
from this process or from workers. Crash-safe: shards are uploaded under `slices/<id>/` first, then `manifest.json`
(the store's commit), then one catalog transaction records the slice, shards, objects and quarantine. A crash before
that leaves no visible slice and the objects unseen; the rerun rebuilds the same slice id with the same content.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from wudao.catalog import Catalog, QuarantineRecord, SeenObject, Shard, Slice, Tokenizer
from wudao.config import IngestSettings
from wudao.data.dedup import Candidate, DedupIndex
from wudao.data.quarantine import Rejected
from wudao.data.read import CHUNK_RECORDS, KeptImage, KeptTexts, Part, encode
from wudao.data.shards import ImageShardWriter, TokenShardWriter, token_dtype
from wudao.data.tokenizer import EOS, load_tokenizer, tokenizer_key, tokenizer_version, train_tokenizer
from wudao.results import IngestResult
from wudao.storage import ObjectInfo, ObjectStore, join_key


def is_heldout(doc_hash: str, fraction: float) -> bool:
    """Stable split by content hash: the same document is held out in every run and on every machine."""
    return int(doc_hash[:12], 16) % 1_000_000 < fraction * 1_000_000


class SliceBuilder:
    """The reduce side of one ingest; feed parts in listing order with `add`, then `commit`."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        catalog: Catalog,
        settings: IngestSettings,
        source_id: int,
        slice_id: str,
        seq: int,
        tokenizer_row: Tokenizer | None,
        report: IngestResult,
    ):
        self.store, self.catalog, self.settings = store, catalog, settings
        self.source_id, self.slice_id, self.seq = source_id, slice_id, seq
        self.prefix = f"slices/{slice_id}"
        self.report = report
        self.dedup = DedupIndex(catalog, slice_id)
        self._tmp = tempfile.TemporaryDirectory(prefix="wudao-ingest-")
        self.tmp = Path(self._tmp.name)
        self.rejected: list[Rejected] = []
        self.objects: list[ObjectInfo] = []
        self.new_tokenizer: Tokenizer | None = None
        self.tok = None
        self.tokenizer_json: str | None = None
        """The slice's tokenizer as sent to readers (None until the first slice has trained it)."""
        if tokenizer_row is not None:
            self._use_tokenizer(store.get_bytes(tokenizer_key(tokenizer_row.version)).decode(), tokenizer_row.version)
        # Until the first slice's tokenizer is trained, kept documents wait here (bounded by the sample size).
        self._sample: list[tuple[str, str]] = []  # (text, hash)
        self._sample_bytes = 0
        self._images_waiting: list[KeptImage] = []

    def _use_tokenizer(self, tokenizer_json: str, version: str) -> None:
        self.tokenizer_json = tokenizer_json
        self.tok, self.report.tokenizer_version = load_tokenizer(tokenizer_json.encode()), version
        self.eos = self.tok.token_to_id(EOS)
        self.dtype = token_dtype(self.tok.get_vocab_size())
        self.train = TokenShardWriter(
            self.store, self.prefix, "train", self.dtype, self.settings.shard_tokens, self.tmp
        )
        self.heldout = TokenShardWriter(
            self.store, self.prefix, "heldout", self.dtype, self.settings.shard_tokens, self.tmp
        )
        self.images = ImageShardWriter(self.store, self.prefix, self.settings.shard_images, self.tmp)

    def add(self, objects: list[ObjectInfo], part: Part) -> None:
        """One part of a batch; `objects` are the batch's objects, given with its first part only."""
        self.objects.extend(objects)
        self.rejected.extend(part.rejected)
        self.report.low_quality_rules = dict(Counter(self.report.low_quality_rules) + part.low_quality_rules)
        docs = part.texts
        verdicts = self.dedup.check_and_add(
            [Candidate(h, k, lang) for h, k, lang in zip(docs.hashes, docs.band_keys, docs.langs)]
            + [Candidate(i.hash, [], "image") for i in part.images]
        )
        keep = np.zeros(len(docs), dtype=bool)
        for n, verdict in enumerate(verdicts[: len(docs)]):
            if verdict == "exact":
                self.report.duplicates_exact += 1
            elif verdict == "near":
                self.report.duplicates_near += 1
            else:
                keep[n] = True
        self._keep_texts(docs, keep)
        for img, verdict in zip(part.images, verdicts[len(docs) :]):
            if verdict:
                self.report.duplicates_exact += 1
            else:
                self._keep_image(img)

    def _keep_texts(self, docs: KeptTexts, keep: np.ndarray) -> None:
        for n in np.flatnonzero(keep).tolist():
            self.report.languages[docs.langs[n]] = self.report.languages.get(docs.langs[n], 0) + 1
        self.report.documents_accepted += int(keep.sum())
        if docs.tokens is not None:  # tokenized by the reader
            hashes = [h for h, k in zip(docs.hashes, keep) if k]
            self._write([ids for ids, k in zip(docs.token_ids(), keep) if k], hashes)
            return
        pairs = [(t, h) for t, h, k in zip(docs.texts or [], docs.hashes, keep) if k]
        if self.tok is not None:
            self._write_texts(pairs)
            return
        self._sample.extend(pairs)
        self._sample_bytes += sum(len(t.encode()) for t, _ in pairs)
        if self._sample_bytes >= self.settings.tokenizer_sample_bytes:
            self._train_tokenizer()

    def _write_texts(self, pairs: list[tuple[str, str]]) -> None:
        for i in range(0, len(pairs), CHUNK_RECORDS):
            chunk = pairs[i : i + CHUNK_RECORDS]
            flat, lengths = encode(self.tok, [t for t, _ in chunk])
            ends = np.cumsum(lengths)
            self._write([flat[e - n : e] for e, n in zip(ends.tolist(), lengths.tolist())], [h for _, h in chunk])

    def _write(self, docs: list[np.ndarray], hashes: list[str]) -> None:
        """Each document's ids followed by EOS, into the held-out or the training shards by its hash."""
        heldout = [is_heldout(h, self.settings.heldout_fraction) for h in hashes]
        self.report.documents_heldout += sum(heldout)
        eos = np.array([self.eos], dtype=self.dtype)
        for ids, held in zip(docs, heldout):
            # a new array: a view would keep a whole part's tokens alive while the (slow-filling) held-out shard waits
            (self.heldout if held else self.train).add(np.concatenate([ids.astype(self.dtype, copy=False), eos]))
        self.report.tokens += sum(len(d) + 1 for d in docs)

    def _keep_image(self, img: KeptImage) -> None:
        if self.tok is None:
            self._images_waiting.append(img)
            return
        self.images.add(img.png, img.captions, [e.ids for e in self.tok.encode_batch(img.captions)], img.key)
        self.report.images_accepted += 1
        self.report.captions += len(img.captions)

    def _train_tokenizer(self) -> None:
        texts = [t for t, _ in self._sample] + [c for img in self._images_waiting for c in img.captions]
        tok = train_tokenizer(texts, self.settings.vocab_size)
        version = tokenizer_version(tok)
        self.store.put_bytes(tokenizer_key(version), tok.to_str().encode())
        self.new_tokenizer = Tokenizer(
            version=version, uri=self.store.url(tokenizer_key(version)), vocab_size=tok.get_vocab_size()
        )
        self._use_tokenizer(tok.to_str(), version)
        waiting, self._sample = self._sample, []
        self._write_texts(waiting)
        images, self._images_waiting = self._images_waiting, []
        for img in images:
            self._keep_image(img)

    def commit(self) -> IngestResult:
        """Flush shards, write the manifest (the store commit), then record everything in one transaction."""
        r = self.report
        self.dedup.flush()  # every kept key in the catalog before the manifest makes the slice visible
        r.quarantined = len(self.rejected)
        r.quarantine_reasons = dict(sorted(Counter(q.reason for q in self.rejected).items()))
        kept_anything = r.documents_accepted or self._images_waiting or r.images_accepted
        if self.tok is None and kept_anything:
            self._train_tokenizer()
        shards: list[dict] = []
        if self.tok is not None and kept_anything:
            for writer in (self.train, self.heldout, self.images):
                writer.flush()
            shards = self.train.written + self.heldout.written + self.images.written
            r.shards = len(shards)
            manifest = {
                "slice_id": self.slice_id,
                "source": r.source,
                "tokenizer_version": r.tokenizer_version,
                "dtype": self.dtype.name,
                "shards": shards,
                "documents": r.documents_accepted,
                "heldout_documents": r.documents_heldout,
                "tokens": r.tokens,
                "images": r.images_accepted,
                "languages": dict(sorted(r.languages.items())),
            }
            self.store.put_json(join_key(self.prefix, "quarantine.json"), [asdict(q) for q in self.rejected])
            r.manifest_uri = self.store.commit(self.prefix, manifest)
            r.slice_id = self.slice_id
        self._record(shards)
        self._tmp.cleanup()
        return r

    def _record(self, shards: list[dict]) -> None:
        r = self.report
        slice_id = r.slice_id
        whole_object = {q.key for q in self.rejected if q.record is None}
        with self.catalog.session() as s:
            if self.new_tokenizer is not None:
                s.add(self.new_tokenizer)
                s.flush()  # the slice row references it
            if slice_id:
                s.add(
                    Slice(
                        id=slice_id,
                        seq=self.seq,
                        source_id=self.source_id,
                        tokenizer_version=r.tokenizer_version,
                        manifest_uri=r.manifest_uri,
                        n_documents=r.documents_accepted,
                        n_heldout_documents=r.documents_heldout,
                        n_tokens=r.tokens,
                        n_images=r.images_accepted,
                        languages=json.dumps(r.languages, sort_keys=True),
                    )
                )
                s.flush()
                for sh in shards:
                    ext = ".tar" if sh["split"] == "images" else ".bin"
                    s.add(
                        Shard(
                            slice_id=slice_id,
                            split=sh["split"],
                            key=join_key(self.prefix, sh["name"] + ext),
                            n_tokens=sh.get("tokens", 0),
                            n_documents=sh.get("documents", sh.get("images", 0)),
                            sha256=sh["sha256"],
                        )
                    )
            for obj in self.objects:
                status = "quarantined" if obj.key in whole_object else "ingested"
                s.add(
                    SeenObject(
                        source_id=self.source_id,
                        key=obj.key,
                        size=obj.size,
                        etag=obj.etag,
                        slice_id=slice_id,
                        status=status,
                    )
                )
            for q in self.rejected:
                s.add(
                    QuarantineRecord(
                        source_id=self.source_id,
                        slice_id=slice_id,
                        object_key=q.key,
                        record=q.record,
                        reason=q.reason,
                        detail=q.detail,
                    )
                )
