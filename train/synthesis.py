"""Synthetic (query, passage) pairs, the parts: an instruction-tuned LLM writes a query for each
passage, then a retriever keeps the pair only if the passage ranks within the top k for its query.
The job that runs them, shard by shard over the ranks, is jobs/synthesize.py.

    passages (mining.read_corpus)
      task       optional first stage: a task description per passage (E5-Mistral, Wang et al.
                 arXiv 2401.00368, brainstorms retrieval tasks before writing examples for them;
                 Gecko, Lee et al. arXiv 2403.20327, has the LLM write a task and a query per passage)
      prompt     the template with {passage} (and {task}) filled in, through the chat template
      generate   batched, left-padded; sampling seeded per (passage, draw) (Gumbel-max, below)
      parse      the first line of the reply, quotes and a "Query:" label stripped
      filter     consistency: the source passage's rank for its query among the whole corpus
                 (Promptagator, Dai et al. arXiv 2209.11755, round-trip filtering; Gecko, Lee et
                 al. arXiv 2403.20327, relabels the positive to the best-ranked passage)

E5-Mistral (Wang et al., arXiv 2401.00368) trains on such LLM-written data; the queries of a small
local LLM are weak, and the filter is what keeps the ones a retriever can answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from train.errors import UserError

PLACEHOLDER = "{passage}"
TASK = "{task}"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


# --- the generator ---------------------------------------------------------------------------------


def check_template(template: str, task_prompt: str | None = None) -> None:
    """The query prompt needs the passage, and {task} exactly when a task stage writes one; the task
    prompt needs the passage and cannot hold {task} (nothing fills it)."""
    if PLACEHOLDER not in template:
        raise UserError(f"synth.prompt={template!r}: has no {PLACEHOLDER} placeholder; the passage must go "
                        f"into the prompt (e.g. 'Write a search query for this passage.\\n\\n{PLACEHOLDER}')")
    if task_prompt is None:
        if TASK in template:
            raise UserError(f"synth.prompt={template!r}: holds {TASK}, but synth.task_prompt is not set; set a "
                            f"task prompt (e.g. synth=task_query) or take {TASK} out")
        return
    if PLACEHOLDER not in task_prompt:
        raise UserError(f"synth.task_prompt={task_prompt!r}: has no {PLACEHOLDER} placeholder; the task is "
                        f"written for a passage (e.g. 'Describe a search task this passage answers.\\n\\n"
                        f"{PLACEHOLDER}')")
    if TASK in task_prompt:
        raise UserError(f"synth.task_prompt={task_prompt!r}: holds {TASK}, which nothing fills at the task stage")
    if TASK not in template:
        raise UserError(f"synth.prompt={template!r}: has no {TASK} placeholder, but synth.task_prompt is set: the "
                        f"query must be written for the task (e.g. 'Task: {TASK}\\nWrite a query for it ...')")


def check_causal_lm(path: str) -> None:
    """Refuse an encoder (or an encoder-decoder) before any weight loads: config.json alone tells."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"synth.generator={path}: cannot read its config.json ({str(e).splitlines()[0]})") from None
    arch = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False) or not any(a.endswith(CAUSAL_SUFFIXES) for a in arch):
        raise UserError(f"synth.generator={path}: is not a causal LM (config.json architectures {arch or 'unset'}, "
                        f"model_type {config.model_type!r}); expected a decoder such as LlamaForCausalLM, "
                        "e.g. an instruction-tuned LLM")


def load_generator(path: str, device: torch.device):
    """(model, tokenizer) in float32, eval mode, left padding (generation appends on the right)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_causal_lm(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def render(tokenizer, template: str, passage: str, max_passage_tokens: int, task: str | None = None) -> str:
    """The prompt for one passage: cut to max_passage_tokens, put into the template (with its task,
    if any), then wrapped in the chat template when the tokenizer has one (instruct models answer
    in their format)."""
    ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
    if len(ids) > max_passage_tokens:
        passage = tokenizer.decode(ids[:max_passage_tokens])
    # One pass over the template, so a passage that contains "{task}" (or a task "{passage}") stays as written.
    fill = {PLACEHOLDER: passage, TASK: task or ""}
    text = re.sub(r"\{passage\}|\{task\}", lambda m: fill[m.group(0)], template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def passage_seed(seed: int, passage_id: str) -> int:
    """A 63-bit seed from (run seed, passage id): a passage's sample does not depend on which batch,
    shard or rank it falls into."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\x00{passage_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_seed(seed: int, passage_id: str, draw: int) -> int:
    """The seed of a passage's query number `draw` (synth.queries_per_passage): the first is the passage's
    own seed (one query per passage samples as before), the others their own streams."""
    return passage_seed(seed, passage_id if draw == 0 else f"{passage_id}\x00query {draw}")


def task_seed(seed: int, passage_id: str) -> int:
    """The seed of a passage's task description: a stream apart from its queries'."""
    return passage_seed(seed, f"{passage_id}\x00task")


class GumbelSampling:
    """A logits processor that turns greedy decoding into sampling at `temperature`, one generator
    per row: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T) (the Gumbel-max
    trick). Row r's t-th token uses the t-th draw of its own generator, so the sample depends on the
    passage and the seed, not on what else is in the batch."""

    def __init__(self, seeds: list[int], temperature: float):
        self.temperature = temperature
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores [B, V]
        u = torch.stack([torch.rand(scores.shape[1], generator=g, dtype=torch.float64) for g in self.gens])  # [B, V]
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-12)))
        return scores.float() / self.temperature + gumbel.to(scores.device, torch.float32)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], seeds: list[int], max_new_tokens: int,
             temperature: float) -> list[str]:
    """One reply per prompt, decoded without special tokens. temperature 0: greedy."""
    from transformers import LogitsProcessorList

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    processors = LogitsProcessorList([GumbelSampling(seeds, temperature)] if temperature > 0 else [])
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # [B]


# Lead-ins a small instruct model writes before (or instead of) the query, seen with SmolLM2-135M:
# "Query: ...", "A user could type: ...", "A user could search for "..." to find ...", "The passage is:".
_LEAD_IN = re.compile(r"^\s*(?:\*\*)?(?:a\s+user\s+(?:could|might|would)\s+(?:type|search\s+for|search|ask)\s*:?|"
                      r"the\s+passage\s+is\s*:|(?:search\s+)?query\s*\d*\s*[:\-]|[qa]\s*:)\s*(?:\*\*)?\s*",
                      re.IGNORECASE)
_QUOTED = re.compile(r"[\"“]([^\"“”]{2,})[\"”]")


def parse_query(reply: str) -> str:
    """The query in an LLM's reply: its first non-empty line without a lead-in ('Query:', 'A user
    could type:'), list marker or quotes. A quoted span in it is taken as the query (SmolLM2 often
    quotes it inside a sentence), so a query that itself quotes a phrase is cut to that phrase.
    '' when nothing is left (the pair is then dropped and counted)."""
    line = next((s.strip() for s in reply.splitlines() if s.strip()), "")
    line = _LEAD_IN.sub("", line, count=1)
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line).strip()
    quoted = _QUOTED.search(line)
    if quoted:
        line = quoted.group(1)
    return line.strip().strip("\"'`“”").strip()


_TASK_LEAD_IN = re.compile(r"^\s*(?:\*\*)?(?:(?:retrieval\s+|search\s+)?task(?:\s+description)?|instruction)\s*"
                           r"\d*\s*[:\-]\s*(?:\*\*)?\s*", re.IGNORECASE)


def parse_task(reply: str) -> str:
    """The task description in an LLM's reply: its first non-empty line without a 'Task:' label, list
    marker or surrounding quotes (quotes inside it stay: a task may quote a phrase). '' when nothing
    is left (the passage then gets no query, and is counted)."""
    line = next((s.strip() for s in reply.splitlines() if s.strip()), "")
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line)
    line = _TASK_LEAD_IN.sub("", line, count=1).strip()
    if len(line) > 1 and line[0] in "\"“'" and line[-1] in "\"”'":
        line = line[1:-1]
    return line.strip()


def distinct_queries(rows: list[dict]) -> list[dict]:
    """The rows that hold a query, without a passage's repeats of one of its queries (the same up to case
    and spacing): a repeat would only weight that pair twice. The first draw stays."""
    seen: set[tuple[int, str]] = set()
    out = []
    for r in rows:
        key = (r["index"], " ".join(r["query"].lower().split()))
        if r["query"] and key not in seen:
            seen.add(key)
            out.append(r)
    return out


# --- shards ------------------------------------------------------------------------------------------


def shard_path(folder: Path, s: int) -> Path:
    return folder / "shards" / f"shard-{s:05d}.jsonl"


def shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def read_shard(path: Path, expected: range, draws: int = 1) -> list[dict]:
    """A shard's rows, one per (passage, draw) in that order; anything else is another plan's folder."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if [(r["index"], r.get("draw", 0)) for r in rows] != [(i, d) for i in expected for d in range(draws)]:
        raise UserError(f"{path}: holds passages {[r['index'] for r in rows][:3]}..., expected {expected.start}-"
                        f"{expected.stop - 1} x {draws} queries; the folder was written by another plan, use a "
                        "new synth.out")
    return rows


# --- consistency filter (pure) -----------------------------------------------------------------------


@dataclass
class Filtered:
    rank: torch.Tensor  # [Q] the source passage's rank among the retrieved (0 best); -1: not retrieved
    keep: torch.Tensor  # [Q] bool: 0 <= rank < k
    positive: torch.Tensor  # [Q] passage index: the source, or (relabel) the best-ranked passage
    negatives: torch.Tensor  # [Q, n] passages ranked at k or below, neither the source nor the positive


def consistency(cand_i: torch.Tensor, source: torch.Tensor, k: int, relabel: bool, num_negatives: int) -> Filtered:
    """cand_i [Q, m] passages by score, best first (m >= k + n + 1); source [Q] the passage each query
    was written for. Keep a pair when its source ranks within the top k; with relabel the positive is
    the top-ranked passage (Gecko), which is the source itself whenever the source ranks first."""
    q, m = cand_i.shape
    hit = cand_i == source.unsqueeze(1)  # [Q, m]
    rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full((q,), -1))  # [Q]
    keep = (rank >= 0) & (rank < k)
    positive = cand_i[:, 0].clone() if relabel else source.clone()
    # Hard negatives from the same ranking: the best passages at ranks k.. that are neither the source
    # nor the positive (anything above rank k may answer the query as well as the source does).
    tail = cand_i[:, k:]  # [Q, m-k]
    ok = (tail != source.unsqueeze(1)) & (tail != positive.unsqueeze(1))
    col = torch.arange(tail.shape[1]).expand_as(tail)
    first = torch.where(ok, col, tail.shape[1]).sort(dim=1).values[:, :num_negatives]  # [Q, n]
    negatives = tail.gather(1, first.clamp(max=max(tail.shape[1] - 1, 0))) if num_negatives else \
        torch.empty((q, 0), dtype=torch.long)
    return Filtered(rank, keep, positive, negatives)
