"""Overhead of the object store layer (sha256 on write, verification on read, atomic local rename) over raw
boto3 transfers of the same bytes, against a real SeaweedFS started for the run. Ratios are measured side by
side, interleaved, so machine noise hits both equally.

    .venv/bin/python bench/storage.py [--mib 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import free_stack_settings  # noqa: E402

from wudao import stack  # noqa: E402
from wudao.storage import S3Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wudao-bench-") as tmp:
        home, cfg = Path(tmp) / "home", free_stack_settings()
        stack.prepare(home)
        pid = stack.start_service(stack.OBJECT_STORE, home, cfg)
        try:
            stack.wait_healthy(stack.OBJECT_STORE, home, cfg, pid)
            key_id, secret = stack.read_s3_credentials(home)
            store = S3Store(
                f"s3://{cfg.bucket}/bench",
                endpoint_url=f"http://127.0.0.1:{cfg.s3_port}",
                access_key_id=key_id,
                secret_access_key=secret,
            )
            src = Path(tmp) / "blob.bin"
            src.write_bytes(os.urandom(args.mib * 1024 * 1024))
            ours_put, raw_put, ours_get, raw_get = [], [], [], []
            for i in range(args.repeats):
                t = time.perf_counter()
                store.client.upload_file(str(src), cfg.bucket, f"bench/raw-{i}", Config=store.transfer)
                raw_put.append(time.perf_counter() - t)
                t = time.perf_counter()
                store.put_file(f"ours-{i}", src)
                ours_put.append(time.perf_counter() - t)
                t = time.perf_counter()
                store.client.download_file(
                    cfg.bucket, f"bench/raw-{i}", str(Path(tmp) / "raw.out"), Config=store.transfer
                )
                raw_get.append(time.perf_counter() - t)
                t = time.perf_counter()
                store.get_file(f"ours-{i}", Path(tmp) / "ours.out")
                ours_get.append(time.perf_counter() - t)
        finally:
            stack.stop_service(home, stack.OBJECT_STORE)
    mib = args.mib
    result = {
        "mib": mib,
        "put_over_raw": statistics.median(ours_put) / statistics.median(raw_put),
        "get_over_raw": statistics.median(ours_get) / statistics.median(raw_get),
        "put_mib_s": mib / statistics.median(ours_put),
        "get_mib_s": mib / statistics.median(ours_get),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:14s} {v:.2f}")


if __name__ == "__main__":
    main()
