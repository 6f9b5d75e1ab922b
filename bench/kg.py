"""KG cloze probing: the shared-prefix scorer (Part A encoded once, its KV cache shared by every candidate of the
closed answer space) against the naive one-forward-per-candidate scorer, same model, same facts, one run.
Target: >= 3x.

    .venv/bin/python bench/kg.py [--facts 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_kg import _model, small_kg  # noqa: E402
from wudao.data.glm import SpecialIds  # noqa: E402
from wudao.data.tokenizer import train_tokenizer  # noqa: E402
from wudao.eval.kg import _cloze_inputs, naive_cloze_sums, parse_kg  # noqa: E402
from wudao.model import cloze_scores  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kg = parse_kg(*small_kg(60))
    tok = train_tokenizer([t.replace("[X]", f.subject).replace("[Y]", f.object) for f in kg.facts for t in kg.templates[(f.relation, f.lang)]], 700)
    ids, model = SpecialIds.from_tokenizer(tok), _model(tok).eval()
    probes = []
    for fact in kg.facts[: args.facts]:
        part_a, lead = _cloze_inputs(kg.templates[(fact.relation, fact.lang)][0], fact.subject, tok, ids)
        probes.append((part_a, [tok.encode(lead + g.object).ids for g in kg.facts if g.lang == fact.lang]))
    shared_s = naive_s = 0.0
    with torch.no_grad():
        for part_a, candidates in probes:  # interleaved, so machine noise hits both
            t = time.perf_counter()
            cloze_scores(model, part_a, ids, candidates)
            shared_s += time.perf_counter() - t
            t = time.perf_counter()
            naive_cloze_sums(model, part_a, ids, candidates)
            naive_s += time.perf_counter() - t
    result = {"shared_over_naive": naive_s / shared_s, "shared_facts_per_s": len(probes) / shared_s,
              "naive_facts_per_s": len(probes) / naive_s, "answer_space": len(probes[0][1])}  # fmt: skip
    print(json.dumps(result) if args.json else "\n".join(f"{k:20s} {v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
