"""The `select` step: turns scored prompt samples (the `sample` step's `responses`, scored by the
`reward` step) into new training samples, each derived from its prompt.

Rules (`rules`, any of them; each derives at most one sample per prompt):

- `best_of_n`: an SFT / cold-start sample from the best passing response (highest `reward`, the
  first of equals): kind `conversation`, the prompt as it was asked (its mode's switch, its media
  placed) followed by the response as the assistant turn, `mode` the response's;
- `pairs`: a preference sample: `chosen` is the best passing response; `rejected` is the worst
  failing one (`rejected: worst`, the lowest `reward` among those that did not pass), or, with
  `rejected: <reward name>` (`repetition`, `format`, `consistency`, ...), the response that fails
  that reward worst (`rewards[name] < below`, the lowest) while `chosen` must clear it
  (`rewards[name] >= below`); `min_margin` asks chosen's `reward` to beat rejected's by that much;
- `rl_prompts`: the prompt, kept when `min_pass < pass_rate < max_pass` (GRPO learns nothing from
  prompts every response passes or fails);
- `difficulty`: the prompt, kept when its `difficulty` bucket is in `keep` (or not in `drop`).

A prompt kept by `rl_prompts` or `difficulty` becomes a kind `conversation` sample ending in its
reference answer as the assistant turn (the conversation's own final assistant turn, else
`meta.answer`), the form the GRPO loader reads, with `pass_rate` and `difficulty` kept.

Every derived sample has `parent_id` (the prompt's id), the id `<parent>@<rule>`, and in
`meta.select` its rule, the rule's parameters and what it chose (response indices, seeds,
rewards, pass rate, bucket). Derived samples carry no `responses` (`keep_responses: true` keeps
them) and no token counts (the `tokens` step, after this one, counts what they now hold).
The prompt itself then leaves with `split_into_selections` (detail: the rules that derived),
or, when no rule derived anything, with its rule's reason (`no_passing_response`, `no_pair`,
`pass_rate_out_of_range`, `difficulty_not_kept`; `not_selected` naming each rule's reason when
several rules are set), so the ledger balances: inputs + derived = kept + dropped. Samples with
neither responses nor a `pass_rate` (not scored) pass untouched.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from reelforge.curation.schema import alive, drop
from reelforge.curation.step import RowStep, register_step
from reelforge.mixers.chat import MODES
from reelforge.mixers.modes import _meta
from reelforge.mixers.reward import infer_mode
from reelforge.mixers.sample import SAMPLE_MODES, asked_turns

RULES = ("best_of_n", "pairs", "rl_prompts", "difficulty")
FAILED = {"best_of_n": "no_passing_response", "pairs": "no_pair", "rl_prompts": "pass_rate_out_of_range",
          "difficulty": "difficulty_not_kept"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "best_of_n": {"min_reward": None},
    "pairs": {"rejected": "worst", "below": 0.5, "min_margin": 0.0},
    "rl_prompts": {"min_pass": 0.0, "max_pass": 1.0},
    "difficulty": {"keep": None, "drop": None},
}


def _num(x: Any) -> float:
    return float("-inf") if x is None else float(x)


def best_passing(responses: list[dict], need: str | None = None, below: float = 0.5) -> int | None:
    """The index of the passing response with the highest `reward` (the first of equals); with `need`,
    only among those whose `rewards[need]` is at least `below`. None when none passes."""
    ok = [j for j, r in enumerate(responses) if r.get("passed") is True and
          (need is None or _num((r.get("rewards") or {}).get(need)) >= below)]
    return min(ok, key=lambda j: (-_num(responses[j].get("reward")), j)) if ok else None


def worst_failing(responses: list[dict], by: str = "worst", below: float = 0.5) -> int | None:
    """`by: worst`: the failed response with the lowest `reward`; `by: <reward name>`: the response whose
    `rewards[name]` is below `below`, the lowest (then the lowest `reward`); the first of equals. None
    when there is none."""
    if by == "worst":
        bad = [j for j, r in enumerate(responses) if r.get("passed") is False]
        return min(bad, key=lambda j: (_num(responses[j].get("reward")), j)) if bad else None
    bad = [j for j, r in enumerate(responses) if (r.get("rewards") or {}).get(by) is not None
           and float(r["rewards"][by]) < below]
    return min(bad, key=lambda j: (float(responses[j]["rewards"][by]), _num(responses[j].get("reward")), j)) \
        if bad else None


def response_mode(row: dict, resp: dict) -> str:
    """The mode a response was asked in: its own, else the sample's, else the one its form claims."""
    m = resp.get("mode") or row.get("mode")
    return m if m in SAMPLE_MODES else infer_mode(resp.get("text") or "")


def _asked(row: dict, mode: str) -> list[dict]:
    turns = asked_turns(row, mode if mode in SAMPLE_MODES else "thinking")
    if turns is None:
        raise ValueError("the sample asks nothing (no user turn, no meta.question)")
    return turns


def reference_turn(row: dict) -> dict | None:
    """The reference answer as an assistant turn: the conversation's final assistant turn, else
    `meta.answer` (the first, when it is a list of accepted answers)."""
    msgs = row.get("messages") or []
    if msgs and msgs[-1]["role"] == "assistant":
        return {"role": "assistant", "content": msgs[-1]["content"]}
    a = _meta(row).get("answer")
    a = a[0] if isinstance(a, list) and a else a
    if isinstance(a, bool):
        a = "yes" if a else "no"
    if isinstance(a, (int, float)) or (isinstance(a, str) and a.strip()):
        return {"role": "assistant", "content": str(a).strip()}
    return None


@register_step("select")
class SelectStep(RowStep):
    """Derives SFT samples, preference pairs and RL prompts from scored prompts (see the module's docstring)."""

    def __init__(self, rules: list | str | None = None, rule: str | None = None, best_of_n: dict | None = None,
                 pairs: dict | None = None, rl_prompts: dict | None = None, difficulty: dict | None = None,
                 keep_responses: bool = False, kinds: list | None = None, sources: list | None = None, **kw: Any):
        super().__init__(**kw)
        names = rules if rules is not None else rule
        names = [names] if isinstance(names, str) else list(names or [])
        if not names:
            raise ValueError(f"`rules` names what to derive: any of {', '.join(RULES)}")
        bad = [r for r in names if r not in RULES]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"`rules` are distinct names among {', '.join(RULES)}, got {names}")
        self.rules = names
        given = {"best_of_n": best_of_n, "pairs": pairs, "rl_prompts": rl_prompts, "difficulty": difficulty}
        self.cfg: dict[str, dict[str, Any]] = {}
        for name in RULES:
            extra = given[name] or {}
            if not isinstance(extra, dict) or set(extra) - set(DEFAULTS[name]):
                raise ValueError(f"`{name}` takes {', '.join(DEFAULTS[name])}, got {extra!r}")
            if extra and name not in names:
                raise ValueError(f"`{name}` has settings but is not among `rules`: add it, or remove its settings")
            self.cfg[name] = {**DEFAULTS[name], **extra}
        p = self.cfg["pairs"]
        if not isinstance(p["rejected"], str) or not p["rejected"]:
            raise ValueError("`pairs.rejected` is `worst` or a reward name (repetition, format, consistency, ...)")
        p["below"], p["min_margin"] = float(p["below"]), float(p["min_margin"])
        r = self.cfg["rl_prompts"]
        r["min_pass"], r["max_pass"] = float(r["min_pass"]), float(r["max_pass"])
        if not 0 <= r["min_pass"] < r["max_pass"] <= 1:
            raise ValueError("`rl_prompts` keeps min_pass < pass_rate < max_pass: 0 <= min_pass < max_pass <= 1")
        d = self.cfg["difficulty"]
        if "difficulty" in names:
            if (d["keep"] is None) == (d["drop"] is None):
                raise ValueError("`difficulty` takes either `keep` or `drop`: a list of buckets "
                                 "(unsolved, hard, medium, easy, solved, no_reference, ...)")
            for k in ("keep", "drop"):
                if d[k] is not None:
                    d[k] = [d[k]] if isinstance(d[k], str) else [str(x) for x in d[k]]
        b = self.cfg["best_of_n"]
        b["min_reward"] = None if b["min_reward"] is None else float(b["min_reward"])
        self.keep_responses = bool(keep_responses)
        self.kinds = list(kinds) if kinds else None
        self.sources = list(sources) if sources else None

    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            if not alive(row) or (not row.get("responses") and row.get("pass_rate") is None) or \
                    (self.kinds is not None and row.get("kind") not in self.kinds) or \
                    (self.sources is not None and row.get("source") not in self.sources):
                out.append(row)
                continue
            try:
                children, why = self.derive(row)
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"))
                continue
            if children:
                drop(row, self.name, "split_into_selections",
                     f"{len(children)} derived: {', '.join(json.loads(c['meta'])['select']['rule'] for c in children)}")
            elif len(self.rules) == 1:
                drop(row, self.name, FAILED[self.rules[0]], why[self.rules[0]])
            else:
                drop(row, self.name, "not_selected", "; ".join(f"{k}: {FAILED[k]} ({v})" for k, v in why.items()))
            out.append(row)
            out.extend(children)
        return out

    def derive(self, row: dict) -> tuple[list[dict], dict[str, str]]:
        """(the samples the rules derive from `row`, why each rule that derived nothing did not)."""
        children, why = [], {}
        for name in self.rules:
            got = getattr(self, f"_{name}")(row)
            if isinstance(got, str):
                why[name] = got
            else:
                children.append(got)
        return children, why

    # -- the rules: each returns the derived sample, or why there is none ------------------------------------
    def _child(self, row: dict, rule: str, record: dict, **fields: Any) -> dict:
        child = copy.deepcopy(row)
        child.update(id=f"{row['id']}@{rule}", source_key=f"{row['source_key']}@{rule}", parent_id=row["id"],
                     text_tokens=None, visual_tokens=None, tokens=None, chosen=None, rejected=None)
        child.update(fields)
        if not self.keep_responses:
            child["responses"] = None
        params = {k: v for k, v in self.cfg[rule].items() if v is not None}
        child["meta"] = json.dumps({**_meta(row), "select": {"rule": rule, "parent": row["id"], **params, **record}},
                                   sort_keys=True, ensure_ascii=False)
        return child

    @staticmethod
    def _picked(resp: dict, j: int) -> dict:
        return {"response": j, "seed": resp.get("seed"), "model": resp.get("model"), "reward": resp.get("reward")}

    def _best_of_n(self, row: dict) -> dict | str:
        resps = row.get("responses") or []
        j = best_passing(resps)
        if j is None:
            return f"none of {len(resps)} responses passed"
        best = resps[j]
        floor = self.cfg["best_of_n"]["min_reward"]
        if floor is not None and _num(best.get("reward")) < floor:
            return f"the best passing reward {best.get('reward')} < min_reward {floor}"
        mode = response_mode(row, best)
        msgs = _asked(row, mode) + [{"role": "assistant", "content": best["text"]}]
        return self._child(row, "best_of_n", {**self._picked(best, j), "of": len(resps)}, kind="conversation",
                           messages=msgs, mode=mode if mode in MODES else row.get("mode"))

    def _pairs(self, row: dict) -> dict | str:
        c = self.cfg["pairs"]
        resps = row.get("responses") or []
        need = None if c["rejected"] == "worst" else c["rejected"]
        i = best_passing(resps, need, c["below"])
        if i is None:
            return "no passing response" + ("" if need is None else f" with {need} >= {c['below']}")
        j = worst_failing(resps, c["rejected"], c["below"])
        if j is None:
            return "no failing response" if need is None else f"no response with {need} < {c['below']}"
        if j == i or resps[i]["text"] == resps[j]["text"]:
            return "the chosen and rejected responses are the same text"
        margin = _num(resps[i].get("reward")) - _num(resps[j].get("reward"))
        if c["min_margin"] > 0 and not margin >= c["min_margin"]:
            return f"reward margin {margin:.4g} < min_margin {c['min_margin']}"
        mode = response_mode(row, resps[i])
        record = {"chosen_response": self._picked(resps[i], i), "rejected_response": self._picked(resps[j], j),
                  "of": len(resps)}
        return self._child(row, "pairs", record, kind="preference", messages=_asked(row, mode),
                           chosen=resps[i]["text"], rejected=resps[j]["text"],
                           mode=mode if mode in MODES else row.get("mode"))

    def _prompt(self, row: dict, rule: str, record: dict) -> dict:
        resps = row.get("responses") or []
        mode = response_mode(row, resps[0]) if resps else (row.get("mode") if row.get("mode") in SAMPLE_MODES
                                                            else "auto_think")
        ref = reference_turn(row)
        msgs = _asked(row, mode) + ([ref] if ref else [])
        return self._child(row, rule, {**record, "reference": ref is not None}, kind="conversation", messages=msgs,
                           mode=mode if mode in MODES else row.get("mode"))

    def _rl_prompts(self, row: dict) -> dict | str:
        c = self.cfg["rl_prompts"]
        pr = row.get("pass_rate")
        if pr is None:
            return "no pass rate (run the reward step first)"
        if not c["min_pass"] < pr < c["max_pass"]:
            return f"pass rate {pr:.4g} not in ({c['min_pass']}, {c['max_pass']})"
        return self._prompt(row, "rl_prompts", {"pass_rate": pr})

    def _difficulty(self, row: dict) -> dict | str:
        c = self.cfg["difficulty"]
        bucket = row.get("difficulty")
        if bucket is None:
            return "no difficulty (run the reward step first)"
        kept = bucket in c["keep"] if c["keep"] is not None else bucket not in c["drop"]
        if not kept:
            return f"bucket {bucket} is not kept"
        return self._prompt(row, "difficulty", {"bucket": bucket, "pass_rate": row.get("pass_rate")})
