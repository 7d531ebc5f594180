"""The model card's text from hand-made inputs: metadata, the before/after/best table."""

from __future__ import annotations

import yaml

from train import assets
from train.card import CardInfo, render


def test_card_from_hand_made_inputs():
    info = CardInfo(name="run1", recipe="simcse_sup", command="python -m train recipe=simcse_sup",
                    base_model="google-bert/bert-base-uncased", overrides=[("optim.lr=1e-5", "1e-05")],
                    data={"nli": {"origin": "hub:princeton-nlp/datasets-for-simcse/nli_for_simcse.csv",
                                  "records": 3, "fingerprint": "abc"},
                          "wiki": {"origin": str(assets.cache_dir() / "wiki" / "sentences.jsonl"), "records": 2,
                                   "size": 12, "sampled_blake2b": "0f"}},
                    tasks={"sts": {"kind": "sts", "path": "/x/sts.jsonl", "limit": 100}})
    before, after = {"sts/spearman": 0.5}, {"sts/spearman": 0.625}
    text = render(info, before, after, best={"step": 250, "metric": "sts/spearman", "metrics": {"sts/spearman": 0.7}})
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert meta["datasets"] == ["princeton-nlp/datasets-for-simcse"]  # the wiki asset has no Hub name
    # the folder holds the selected step's model: its figures are the metadata's, not the last step's
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "spearman", "value": 0.7}]
    plain = yaml.safe_load(render(info, before, after).split("---\n", 2)[1])
    assert plain["model-index"][0]["results"][0]["metrics"] == [{"type": "spearman", "value": 0.625}]
    assert "| `sts/spearman` | 0.5000 | 0.6250 | +0.1250 | 0.7000 |" in body
    assert "best (step 250)" in body and "`sts` (cut to its first 100)" in body
    assert "| `optim.lr=1e-5` | `1e-05` |" in body and "| wiki |" in body
    assert "size `12`; sampled_blake2b `0f` |" in body


def test_card_of_a_run_without_evaluation_or_hub_names():
    info = CardInfo(name="r", recipe="-", command="python -m train", base_model="/some/local/model")
    meta = yaml.safe_load(render(info, None, {}).split("---\n", 2)[1])
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta
    assert "No evaluation tasks were configured" in render(info, None, {})
