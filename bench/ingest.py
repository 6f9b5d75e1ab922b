"""Ingest throughput against datatrove on the same generated bilingual corpus, scaling with worker processes, the
ingest flow on a Dask cluster, and peak memory at two sizes.

Ours: the whole `wudao ingest` pipeline (read -> NFKC/clean -> language id (lingua) -> quality rules -> PII ->
MinHash -> tokenize in the workers; exact + near dedup against the catalog -> shards -> commit in the main process),
on a second slice: the tokenizer was trained on a small first slice, as in steady-state lifelong operation.
datatrove 0.10 doing the equivalent offline work on the same files: JsonlReader -> MinhashDedupSignature -> Buckets
-> Cluster -> Filter -> DocumentTokenizer with our tokenizer file. Its LanguageFilter needs a fastText model from a
hub, which these machines cannot reach, so datatrove does no language id or quality filtering here (ours does: the
comparison favours datatrove). Both use 14 x 8 MinHash bands over word 5-grams (character 5-grams for Chinese,
through the same word splitter).

For each worker count W in --workers, ours runs with `ingest.workers = W` and datatrove with W tasks, each whole
run pinned to W cores (sched_setaffinity, inherited by every process it starts): W is cores, not just processes, so
multi-threaded Rust parts (tokenizers, lingua) cannot borrow idle cores on either side. The Dask run is the `ingest`
flow with prefect-dask's DaskTaskRunner (W worker processes, one thread each, cluster start included in its time)
on the largest W. Peak RSS is the main process's (workers are reported separately).

    .venv/bin/pip install -e '.[bench]'      # datatrove (bench-only extra)
    .venv/bin/python bench/ingest.py [--mb 200] [--small-mb 50] [--workers 1,2] [--json]
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

_EN_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or his which but not have had "
    "they you were their one all we can her has there been if more when will would who so no time people year "
    "water day way city river house work world school life family night morning story garden window road "
    "bridge market village mountain teacher student music book letter friend summer winter boat field"
).split()
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
                    text = " ".join(
                        " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(8, 18))).capitalize() + "."
                        for _ in range(rng.randint(6, 14))
                    )
                else:
                    text = "".join(
                        "".join(rng.choice(_HAN) for _ in range(rng.randint(10, 30))) + "。"
                        for _ in range(rng.randint(6, 14))
                    )
                recent = (recent + [text])[-200:]
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                n_docs += 1
        written += size
        part += 1
    return n_docs


def _settings(work: Path, workers: int):
    from wudao.config import Settings

    return Settings(home=work / "home", storage_uri=str(work / "objects"), ingest={"workers": workers}).resolved()


def _warm_up(settings, work: Path) -> None:
    """The steady state of a lifelong platform: the tokenizer was trained (and frozen) on an earlier slice."""
    from wudao.stages import run_ingest

    make_corpus(work / "warmup", 2, seed=2)
    report = run_ingest(settings, str(work / "warmup"))
    (work / "tokenizer.json").write_bytes(
        (work / "objects" / "tokenizer" / report["tokenizer_version"] / "tokenizer.json").read_bytes()
    )


def _peaks() -> dict:
    """Peak RSS and CPU seconds of this process and of the processes it started (CPU time does not drift with a
    noisy neighbour the way wall time does: it shows where the work went)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "max_rss_mb": me.ru_maxrss / 1024,
        "worker_max_rss_mb": children.ru_maxrss / 1024,
        "main_cpu_s": me.ru_utime + me.ru_stime,
        "worker_cpu_s": children.ru_utime + children.ru_stime,
    }


def run_ours(corpus: Path, work: Path, workers: int) -> dict:
    from wudao.stages import run_ingest

    settings = _settings(work, workers)
    _warm_up(settings, work)
    start = time.perf_counter()
    report = run_ingest(settings, str(corpus))
    return {
        "seconds": time.perf_counter() - start,
        "documents": report["documents_accepted"],
        "near": report["duplicates_near"],
        "exact": report["duplicates_exact"],
        "tokens": report["tokens"],
        **_peaks(),
    }


def run_dask(corpus: Path, work: Path, workers: int) -> dict:
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from flows.common import ensure_server_setup
    from flows.ingest import ingest_flow

    # Dask's worker processes inherit this: one core's work each, as the platform's own worker processes do.
    os.environ.update({"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    settings = _settings(work, workers)
    _warm_up(settings, work)
    overrides = {"home": str(settings.home), "storage_uri": settings.storage_uri, "catalog_url": settings.catalog_url}
    with prefect_test_harness(server_startup_timeout=180):
        ensure_server_setup(settings)
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1})
        start = time.perf_counter()
        report = ingest_flow.with_options(task_runner=runner)(source=str(corpus), overrides=overrides)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "documents": report["documents_accepted"],
        "near": report["duplicates_near"],
        "exact": report["duplicates_exact"],
        "tokens": report["tokens"],
        **_peaks(),
    }


def run_datatrove(corpus: Path, work: Path, workers: int, tokenizer_file: Path) -> dict:
    import re

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
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
        [
            JsonlReader(str(corpus)),
            MinhashDedupFilter(input_folder=remove),
            DocumentTokenizer(output_folder=tokens, tokenizer_name_or_path=str(tokenizer_file), eos_token="[EOS]"),
        ],
    ]
    for n, pipeline in enumerate(stages):
        tasks = {0: workers, 1: config.num_buckets, 2: 1, 3: workers}[n]  # clustering runs as a single task
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=min(tasks, workers), logging_dir=f"{logs}/{n}"
        ).run()
    return {"seconds": time.perf_counter() - start, **_peaks()}


def _child(mode: str, corpus: Path, work: Path, workers: int) -> dict:
    """Each pipeline in a fresh process pinned to `workers` cores, so peak RSS, imports and cores are its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--_child", mode, str(corpus), str(work), str(workers)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    print(f"{mode} ({workers} worker(s)): {out.stdout.strip().splitlines()[-1]}", file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pin(workers: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        raise SystemExit(f"--workers {workers}: only {len(cores)} core(s) here")
    os.sched_setaffinity(0, cores[:workers])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="corpus size for the throughput comparison")
    ap.add_argument("--small-mb", type=int, default=50, help="second size for the peak-memory ratio")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (= cores) to compare")
    ap.add_argument("--no-dask", action="store_true", help="skip the ingest flow on a Dask cluster")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        mode, corpus, work, workers = args._child
        _pin(int(workers))
        run = {"ours": run_ours, "dask": run_dask}.get(mode)
        result = (
            run(Path(corpus), Path(work), int(workers))
            if run
            else run_datatrove(Path(corpus), Path(work), int(workers), Path(work).parent / "ours-1" / "tokenizer.json")
        )
        print(json.dumps(result))
        return
    counts = sorted({int(w) for w in args.workers.split(",")})
    most = counts[-1]
    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory(prefix="wudao-bench-ingest-") as tmp:
        tmp = Path(tmp)
        docs = make_corpus(tmp / "large", args.mb)
        make_corpus(tmp / "small", args.small_mb, seed=1)
        for w in counts:  # side by side at each core count (the machine is shared: neighbours in time compare best)
            ours[w] = _child("ours", tmp / "large", tmp / f"ours-{w}", w)
            theirs[w] = _child("datatrove", tmp / "large", tmp / f"datatrove-{w}", w)
        small = _child("ours", tmp / "small", tmp / f"ours-small-{most}", most)
        dask = None if args.no_dask else _child("dask", tmp / "large", tmp / f"dask-{most}", most)
    same = {(o["documents"], o["exact"], o["near"], o["tokens"]) for o in ours.values()}
    result = {
        "ours_over_datatrove": {str(w): theirs[w]["seconds"] / ours[w]["seconds"] for w in counts},
        "rss_ratio": ours[most]["max_rss_mb"] / small["max_rss_mb"],
        "workers": counts,
        "corpus_mb": args.mb,
        "documents": docs,
        "same_result_every_worker_count": len(same) == 1,
        "ours_docs_per_s": {str(w): docs / ours[w]["seconds"] for w in counts},
        "ours_mb_per_s": {str(w): args.mb / ours[w]["seconds"] for w in counts},
        "datatrove_docs_per_s": {str(w): docs / theirs[w]["seconds"] for w in counts},
        "ours_max_rss_mb": {f"{args.small_mb}MB": small["max_rss_mb"], f"{args.mb}MB": ours[most]["max_rss_mb"]},
        "ours_worker_max_rss_mb": ours[most]["worker_max_rss_mb"],
        "datatrove_max_rss_mb": theirs[most]["max_rss_mb"],
        "ours_duplicates": {"exact": ours[most]["exact"], "near": ours[most]["near"]},
        "ours_cpu_s": {str(w): {"main": ours[w]["main_cpu_s"], "workers": ours[w]["worker_cpu_s"]} for w in counts},
    }
    if len(counts) > 1:
        result[f"scaling_{most}_over_{counts[0]}"] = ours[counts[0]]["seconds"] / ours[most]["seconds"]
        result[f"datatrove_scaling_{most}_over_{counts[0]}"] = theirs[counts[0]]["seconds"] / theirs[most]["seconds"]
    if dask is not None:
        result["dask_docs_per_s"] = docs / dask["seconds"]
        result["dask_over_ours"] = ours[most]["seconds"] / dask["seconds"]
        result["dask_same_result"] = (dask["documents"], dask["exact"], dask["near"], dask["tokens"]) in same
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v:.2f}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
