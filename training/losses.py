"""Losses beyond next-token prediction: SigLIP's sigmoid contrastive loss (Stage 0), MPO
(0.8 x DPO-sigmoid + 0.2 x BCO + 1.0 x SFT on the chosen answer), and GRPO with rule rewards
(a correct final answer, reasoning consistent with it), group-normalised advantages and a KL
term to a reference model. Pure functions of tensors, so tests can check them by hand."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """-1/n * sum_ij log sigmoid(z_ij * logit_ij), z = +1 on the diagonal, -1 elsewhere (SigLIP)."""
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


class RunningMean:
    """The BCO reward shift delta: running mean of the batch's mean reward (MPO paper)."""

    def __init__(self, mean: float = 0.0, count: int = 0):
        self.mean, self.count = mean, count

    def update(self, x: float) -> float:
        self.count += 1
        self.mean += (x - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}


def mpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, chosen_token_nll: torch.Tensor, beta: float = 0.1,
             weights: dict[str, float] | None = None, delta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """MPO on sequence log-probs (sums over answer tokens) of a batch of pairs.

    dpo = -log sigmoid(beta * ((pc - rc) - (pr - rr)));  bco = -log sigmoid(beta*(pc-rc) - delta)
    - log sigmoid(-(beta*(pr-rr) - delta)); sft = mean NLL over all chosen answer tokens.
    TRL's `bco_pair` is this with delta = 0.
    """
    w = {"dpo": 0.8, "bco": 0.2, "sft": 1.0, **(weights or {})}
    cr = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    dpo = -F.logsigmoid(cr - rr).mean()
    bco = (-F.logsigmoid(cr - delta) - F.logsigmoid(-(rr - delta))).mean()
    sft = chosen_token_nll.mean()
    loss = w["dpo"] * dpo + w["bco"] * bco + w["sft"] * sft
    reward_mean = float(torch.cat([cr, rr]).mean().detach())
    return loss, {"dpo": float(dpo.detach()), "bco": float(bco.detach()), "sft": float(sft.detach()),
                  "reward_mean": reward_mean, "reward_acc": float((cr > rr).float().mean())}


def tempered_token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                         ignore_index: int = -100) -> torch.Tensor:
    """log p(label) under softmax(logits / temperature) per position, 0 where the label is
    ignored: the log-probs of the distribution the rollout sampled from (TRL's
    `selective_log_softmax(..., temperature)`, verl likewise), so the GRPO ratio and KL compare
    the policy the tokens came from."""
    safe = labels.clamp(min=0)
    lp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(labels == ignore_index, 0.0)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(prompts, group) rewards -> advantages normalised within each group (mean 0, std 1)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return ((rewards - mean) / (std + eps)).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """GRPO (DeepSeekMath): per token -[min(r A, clip(r) A) - beta KL], KL = e^(ref-lp) - (ref-lp) - 1,
    averaged over each completion's tokens, then over completions. Shapes (N, T), advantages (N,)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logps - logps
    kl = torch.exp(d) - d - 1
    per_token = -(surrogate - kl_beta * kl)
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    kl_mean = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return per_seq.mean(), {"kl": float(kl_mean.detach())}


_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, final answer) from the report's `<think>..</think><answer>..</answer>`
    format or the released template's `<think>..</think>answer`; plain text is all answer."""
    m = _THINK.search(text)
    reasoning = m.group(1).strip() if m else None
    rest = text[m.end():] if m else text
    a = _ANSWER.search(rest)
    answer = a.group(1) if a else rest
    return reasoning, answer.strip()


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def answer_reward(answer: str, reference: str) -> float:
    """1 for the same normalised answer, else the token F1 against it (partial credit)."""
    a, r = _words(answer), _words(split_reasoning(reference)[1])
    if a == r:
        return 1.0
    if not a or not r:
        return 0.0
    common = sum(min(a.count(w), r.count(w)) for w in set(a))
    if common == 0:
        return 0.0
    p, q = common / len(a), common / len(r)
    return 2 * p * q / (p + q)


def consistency_reward(reasoning: str | None, answer: str) -> float:
    """Share of the answer's words that the reasoning reached; 1 for an answer with no reasoning
    (non-thinking mode), 0 for an empty answer."""
    a = _words(answer)
    if not a:
        return 0.0
    if reasoning is None:
        return 1.0
    r = set(_words(reasoning))
    return sum(w in r for w in a) / len(a)


def rewards_of(completion: str, reference: str, weights: dict[str, float]) -> dict[str, float]:
    reasoning, answer = split_reasoning(completion)
    c, k = answer_reward(answer, reference), consistency_reward(reasoning, answer)
    return {"correct": c, "consistency": k,
            "total": weights.get("correct", 1.0) * c + weights.get("consistency", 0.5) * k}
