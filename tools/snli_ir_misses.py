"""Why the SNLI retrieval stand-in (eval task snli_ir) moves little: what ranks first when the
top hit is not a labelled entailment of the query premise.

    python tools/snli_ir_misses.py MODEL_DIR [MODEL_DIR ...] [--examples 8]

For each model: how many of the 3,089 queries have a labelled entailment at rank 1, and for the
rest whether the top hit is the premise's own neutral or contradiction hypothesis, or a
hypothesis written for another premise (often a generic sentence that is true of the query
too, but unlabelled, so it counts as a miss). Prints a few such misses.
"""

from __future__ import annotations

import argparse
import collections
import json
import random

import torch.nn.functional as F

from train import assets
from train.embed import encode
from train.model import load_encoder

LABELS = {1.0: "own entailment", 0.5: "own neutral", 0.0: "own contradiction"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()

    snli = assets.path("snli")
    own: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for line in open(snli / "test_sts.jsonl"):
        row = json.loads(line)
        own[row["sentence1"]][row["sentence2"]] = LABELS[row["score"]]
    corpus = [json.loads(line)["text"] for line in open(snli / "test_ir" / "corpus.jsonl")]
    queries = [json.loads(line)["text"] for line in open(snli / "test_ir" / "queries.jsonl")]

    for path in args.models:
        encoder = load_encoder(path).eval()
        docs = F.normalize(encode(encoder, corpus, "passage"), dim=-1)
        qs = F.normalize(encode(encoder, queries, "query"), dim=-1)
        top = (qs @ docs.T).argmax(dim=1).tolist()
        kinds = [own[q].get(corpus[t], "no label for this query") for q, t in zip(queries, top)]
        counts = collections.Counter(kinds)
        print(f"{path}: rank-1 hit of {len(queries)} queries: " +
              ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        others = [i for i, k in enumerate(kinds) if k == "no label for this query"]
        for i in random.Random(0).sample(others, min(args.examples, len(others))):
            print(f"  query: {queries[i]}\n    top: {corpus[top[i]]}")


if __name__ == "__main__":
    main()
