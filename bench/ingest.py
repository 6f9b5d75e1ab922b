"""Ingest throughput against datatrove on the same generated bilingual corpus, and peak memory at two sizes.

Ours: the whole `wudao ingest` pipeline in one process (read -> NFKC/clean -> language id (lingua) -> quality
rules -> PII -> exact + MinHash dedup against the catalog -> tokenize -> shards -> commit), on a second slice:
the tokenizer was trained on a small first slice, as in steady-state lifelong operation. datatrove 0.10 doing the equivalent offline work on the same files: JsonlReader ->
MinhashDedupSignature -> Buckets -> Cluster -> Filter -> DocumentTokenizer with our tokenizer file. Its
LanguageFilter needs a fastText model from a hub, which these machines cannot reach, so datatrove does no language
id or quality filtering here (ours does: the comparison favours datatrove). Both use 14 x 8 MinHash bands over
word 5-grams (character 5-grams for Chinese, through the same word splitter), and the same number of worker
processes (BENCH_WORKERS, default 1: both single-process; the JSON says which under "workers"). Peak RSS is the
main process's; with BENCH_WORKERS > 1 the reading processes are not counted in it.

    .venv/bin/pip install datatrove      # bench-only (pyproject extra "bench")
    .venv/bin/python bench/ingest.py [--mb 200] [--small-mb 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_EN_WORDS = ("the of and to in is was for on that with as by at from it an be this are or his which but not have had "
             "they you were their one all we can her has there been if more when will would who so no time people year "
             "water day way city river house work world school life family night morning story garden window road "
             "bridge market village mountain teacher student music book letter friend summer winter boat field").split()  # fmt: skip
WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
_HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 1500)]


def make_corpus(root: Path, megabytes: int, seed: int = 0) -> int:
    """Bilingual jsonl files (~4 MB each) with ~3% exact and ~3% near duplicates; returns the document count."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    target, written, n_docs, part = megabytes * 1_000_000, 0, 0, 0
    recent: list[str] = []
    while written < target:
        with open(root / f"part-{part:05d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            while size < 4_000_000 and written + size < target:
                r = rng.random()
                if recent and r < 0.03:
                    text = rng.choice(recent)
                elif recent and r < 0.06:
                    words = rng.choice(recent).split(" ")
                    words[rng.randrange(len(words))] = rng.choice(_EN_WORDS)
                    text = " ".join(words)
                elif rng.random() < 0.5:
                    text = " ".join(" ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(8, 18))).capitalize() + "."
                                    for _ in range(rng.randint(6, 14)))  # fmt: skip
                else:
                    text = "".join("".join(rng.choice(_HAN) for _ in range(rng.randint(10, 30))) + "。"
                                   for _ in range(rng.randint(6, 14)))  # fmt: skip
                recent = (recent + [text])[-200:]
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                n_docs += 1
        written += size
        part += 1
    return n_docs


def run_ours(corpus: Path, work: Path) -> dict:
    from wudao.config import Settings
    from wudao.stages import run_ingest

    settings = Settings(home=work / "home", storage_uri=str(work / "objects"), ingest={"workers": WORKERS}).resolved()
    # The steady state of a lifelong platform: the tokenizer was trained (and frozen) on an earlier slice.
    make_corpus(work / "warmup", 2, seed=2)
    run_ingest(settings, str(work / "warmup"))
    start = time.perf_counter()
    report = run_ingest(settings, str(corpus))
    seconds = time.perf_counter() - start
    (work / "tokenizer.json").write_bytes(
        (work / "objects" / "tokenizer" / report["tokenizer_version"] / "tokenizer.json").read_bytes()
    )
    return {"seconds": seconds, "documents": report["documents_accepted"], "near": report["duplicates_near"],
            "exact": report["duplicates_exact"], "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def run_datatrove(corpus: Path, work: Path, tokenizer_file: Path) -> dict:
    import re

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.utils.word_tokenizers import WordTokenizer

    class BilingualWords(WordTokenizer):
        """The same units ours shingles: words for English, characters for Chinese."""

        pattern = re.compile(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+")

        def word_tokenize(self, text: str) -> list[str]:
            return self.pattern.findall(text.lower())

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    config = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)
    sigs, buckets, remove, tokens = (str(work / d) for d in ("sigs", "buckets", "remove", "tokens"))
    logs = str(work / "logs")
    start = time.perf_counter()
    stages = [
        [JsonlReader(str(corpus)), MinhashDedupSignature(output_folder=sigs, config=config, language=BilingualWords())],
        [MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config)],
        [MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=config)],
        [JsonlReader(str(corpus)), MinhashDedupFilter(input_folder=remove),
         DocumentTokenizer(output_folder=tokens, tokenizer_name_or_path=str(tokenizer_file), eos_token="[EOS]")],
    ]  # fmt: skip
    for n, pipeline in enumerate(stages):
        tasks = {0: WORKERS, 1: config.num_buckets, 2: 1, 3: WORKERS}[n]  # clustering runs as a single task
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(tasks, WORKERS), logging_dir=f"{logs}/{n}").run()
    return {"seconds": time.perf_counter() - start, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(mode: str, corpus: Path, work: Path) -> dict:
    """Each pipeline in a fresh process, so peak RSS and imports are its own."""
    out = subprocess.run([sys.executable, __file__, "--_child", mode, str(corpus), str(work)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="corpus size for the throughput comparison")
    ap.add_argument("--small-mb", type=int, default=50, help="second size for the peak-memory ratio")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        mode, corpus, work = args._child
        result = run_ours(Path(corpus), Path(work)) if mode == "ours" else run_datatrove(Path(corpus), Path(work), Path(work).parent / "ours-large" / "tokenizer.json")
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="wudao-bench-ingest-") as tmp:
        tmp = Path(tmp)
        docs = make_corpus(tmp / "large", args.mb)
        make_corpus(tmp / "small", args.small_mb, seed=1)
        ours = _child("ours", tmp / "large", tmp / "ours-large")
        small = _child("ours", tmp / "small", tmp / "ours-small")
        theirs = _child("datatrove", tmp / "large", tmp / "datatrove")
    result = {
        "ours_over_datatrove": theirs["seconds"] / ours["seconds"],
        "rss_ratio": ours["max_rss_mb"] / small["max_rss_mb"],
        "workers": WORKERS,
        "corpus_mb": args.mb,
        "documents": docs,
        "ours_docs_per_s": docs / ours["seconds"],
        "ours_mb_per_s": args.mb / ours["seconds"],
        "datatrove_docs_per_s": docs / theirs["seconds"],
        "ours_seconds": ours["seconds"],
        "datatrove_seconds": theirs["seconds"],
        "ours_max_rss_mb": {f"{args.small_mb}MB": small["max_rss_mb"], f"{args.mb}MB": ours["max_rss_mb"]},
        "datatrove_max_rss_mb": theirs["max_rss_mb"],
        "ours_duplicates": {"exact": ours["exact"], "near": ours["near"]},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:22s} {v:.2f}" if isinstance(v, float) else f"{k:22s} {v}")


if __name__ == "__main__":
    main()
