"""MPO, GRPO, SigLIP losses and the GRPO rewards against independent computations on hand-made numbers."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import torch

from reelforge.training.losses import (
    RunningMean,
    answer_reward,
    consistency_reward,
    group_advantages,
    grpo_loss,
    mpo_loss,
    rewards_of,
    siglip_loss,
    split_reasoning,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _pairs():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 6
    tok = -torch.rand(2 * B, T, generator=g) * 3  # per-token log-probs, chosen rows then rejected rows
    mask = torch.ones(2 * B, T)
    mask[0, 4:] = 0
    mask[4, 5:] = 0
    mask[:, 0] = 0  # the prompt
    ref = -torch.rand(2 * B, generator=g) * 10
    return tok, mask, ref, B


def test_mpo_equals_hand_computation():
    tok, mask, ref, B = _pairs()
    lp = (tok * mask).sum(1)
    pc, pr, rc, rr = lp[:B], lp[B:], ref[:B], ref[B:]
    nll = -tok[:B][mask[:B].bool()]
    beta, delta = 0.3, 0.17
    loss, st = mpo_loss(pc, pr, rc, rr, nll, beta=beta, delta=delta)
    dpo = bco = 0.0
    for i in range(B):
        c = beta * (float(pc[i]) - float(rc[i]))
        r = beta * (float(pr[i]) - float(rr[i]))
        dpo += -math.log(_sig(c - r)) / B
        bco += (-math.log(_sig(c - delta)) - math.log(_sig(-(r - delta)))) / B
    toks = [-float(tok[i, t]) for i in range(B) for t in range(tok.shape[1]) if mask[i, t]]
    sft = sum(toks) / len(toks)
    assert abs(float(loss) - (0.8 * dpo + 0.2 * bco + 1.0 * sft)) < 1e-5
    assert abs(st["dpo"] - dpo) < 1e-5 and abs(st["bco"] - bco) < 1e-5 and abs(st["sft"] - sft) < 1e-5
    w = {"dpo": 0.5, "bco": 0.0, "sft": 2.0}
    assert abs(float(mpo_loss(pc, pr, rc, rr, nll, beta, w, delta)[0]) - (0.5 * dpo + 2.0 * sft)) < 1e-5


def test_mpo_equals_trl_at_delta_zero():
    """TRL's DPOTrainer with loss_type [sigmoid, bco_pair, sft] and weights [0.8, 0.2, 1.0] (its MPO)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    tok, mask, ref, B = _pairs()
    T = tok.shape[1] + 1
    completion_mask = torch.cat([torch.zeros(2 * B, 1), mask], 1).long()  # TRL shifts it by one

    def fake_model(**kw):
        lp = tok * mask
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))

    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                           loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1,
                           use_weighting=False, label_smoothing=0.0, _tp_size=1, _total_train_tokens=0,
                           _metrics={"train": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss = DPOTrainer._compute_loss(fake, fake_model, inputs, False)
    lp = (tok * mask).sum(1)
    ours, _ = mpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], -tok[:B][mask[:B].bool()], beta=0.1, delta=0.0)
    assert abs(float(trl_loss) - float(ours)) < 1e-6
    # the preference term alone is TRL's sigmoid DPO
    fake.loss_types, fake.loss_weights = ["sigmoid"], [1.0]
    dpo_only, _ = mpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], torch.zeros(1), 0.1, {"dpo": 1, "bco": 0, "sft": 0})
    assert abs(float(DPOTrainer._compute_loss(fake, fake_model, inputs, False)) - float(dpo_only)) < 1e-6


def test_running_mean_delta():
    r = RunningMean()
    for x in (1.0, 2.0, 6.0):
        r.update(x)
    assert r.mean == 3.0 and r.count == 3


def test_grpo_equals_hand_computation():
    g = torch.Generator().manual_seed(1)
    P, G, T = 2, 3, 5
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.9]])
    adv = group_advantages(rewards)
    for p in range(P):
        vals = rewards[p].tolist()
        mu = sum(vals) / G
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (G - 1))
        for i in range(G):
            assert abs(float(adv[p * G + i]) - (vals[i] - mu) / (sd + 1e-4)) < 1e-5
    N = P * G
    logps = -torch.rand(N, T, generator=g)
    old = logps + 0.3 * (torch.rand(N, T, generator=g) - 0.5)
    ref = logps + 0.5 * (torch.rand(N, T, generator=g) - 0.5)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    mask[:, 0] = 1
    eps, beta = 0.2, 0.04
    loss, st = grpo_loss(logps, old, ref, adv, mask, clip_eps=eps, kl_beta=beta)
    total = 0.0
    for i in range(N):
        a, s, n = float(adv[i]), 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            ratio = math.exp(float(logps[i, t]) - float(old[i, t]))
            surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(ref[i, t]) - float(logps[i, t])
            kl = math.exp(d) - d - 1
            s += -(surr - beta * kl)
            n += 1
        total += s / n / N
    assert abs(float(loss) - total) < 1e-5
    # on-policy (old = current, detached), the gradient of the surrogate is A * grad log p
    lp = logps.clone().requires_grad_(True)
    loss2, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, eps, 0.0)
    loss2.backward()
    want = -(adv.unsqueeze(1) * mask / mask.sum(1, keepdim=True)) / N
    torch.testing.assert_close(lp.grad, want)


def test_siglip_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.1, 3.0]])
    want = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            want += -math.log(_sig(z * float(logits[i, j])))
    assert abs(float(siglip_loss(logits)) - want / 3) < 1e-5


def test_rewards():
    assert split_reasoning("<think>red plus blue</think><answer>purple</answer>") == ("red plus blue", "purple")
    assert split_reasoning("<think>\nso it is 4\n</think>\n\n4") == ("so it is 4", "4")
    assert split_reasoning("just 4") == (None, "just 4")
    assert answer_reward("The background is blue.", "<think>x</think><answer>the background is blue</answer>") == 1.0
    assert 0 < answer_reward("background blue", "The background is blue.") < 1
    assert answer_reward("green", "blue") == 0.0
    assert consistency_reward("the shapes make it blue", "blue") == 1.0
    assert consistency_reward("it is red", "blue") == 0.0
    assert consistency_reward(None, "blue") == 1.0 and consistency_reward("x", "") == 0.0
    r = rewards_of("<think>it is blue</think><answer>blue</answer>", "blue", {"correct": 1.0, "consistency": 0.5})
    assert r == {"correct": 1.0, "consistency": 1.0, "total": 1.5}


def test_step_stats_weigh_every_micro_batch_and_rank():
    """The step's logged numbers (train.add_stats / mean_stats): the mean over all its micro-batches on all
    ranks, GRPO's weighted by completions. The loop used to log rank 0's last micro-batch, so under
    grad_accum 2 on 2 ranks this step's reward read 1.0 instead of 0.5."""
    from reelforge.training.train import add_stats, mean_stats

    rank0, rank1 = {}, {}
    add_stats(rank0, {"reward": 0.0, "kl": 0.1, "_weight": 8})  # micro-batch 1: 2 prompts x 4
    add_stats(rank0, {"reward": 1.0, "kl": 0.3, "_weight": 8})  # micro-batch 2
    add_stats(rank1, {"reward": 0.5, "kl": 0.2, "_weight": 16, "note": "x", "flag": True})
    m = mean_stats([rank0, rank1])
    assert set(m) == {"reward", "kl"}
    assert abs(m["reward"] - (0.0 * 8 + 1.0 * 8 + 0.5 * 16) / 32) < 1e-12
    assert abs(m["kl"] - (0.1 * 8 + 0.3 * 8 + 0.2 * 16) / 32) < 1e-12
    mpo: dict = {}
    for st in ({"dpo": 1.0, "delta": 0.5}, {"dpo": 3.0, "delta": 0.5}):  # no _weight: each counts once
        add_stats(mpo, st)
    assert mean_stats([mpo, {}]) == {"dpo": 2.0, "delta": 0.5}
    assert mean_stats([{}, {}]) == {}


def test_reward_summary():
    from reelforge.training.report import reward_summary

    rows = [{"step": i + 1, "reward": r} for i, r in enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])]
    s = reward_summary(rows)
    assert s["window"] == 2 and s["per_step"][3] == 0.3
    assert abs(s["first"] - 0.05) < 1e-12 and abs(s["last"] - 0.85) < 1e-12 and abs(s["rise"] - 0.8) < 1e-12
    assert reward_summary(rows[:3])["window"] == 1 and reward_summary(rows, k=5)["first"] == 0.2


def test_grpo_step_logs_the_mean_rule_reward_of_its_completions(tmp_path):
    """Objective.grpo on a tiny random ReelVLM (no DeepSpeed): `reward` is the mean of rewards_of's total
    over the batch's completions (decoded from the loss batch), `reward_<part>` the mean of each part, and
    `_weight` their number."""
    from test_grpo_positions import G, objective, tiny_vlm
    from transformers import AutoTokenizer

    from reelforge.curation.tiny_models import build_tiny_tokenizer
    from reelforge.training.loader import IGNORE, Item

    tok_dir = build_tiny_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny_vlm(tok)
    obj = objective(model, tok_dir, tmp_path, "1d")
    prompts = ["Say the keyword.", "Which colour is the circle?"]
    items = [Item(tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"],
                  [], [], f"p{i}", "t", "conversation", extra={"reference": ref})
             for i, (q, ref) in enumerate(zip(prompts, ["blue", "red"]))]
    rolled, rollouts = [], obj.rollouts

    def spy(batch):  # the loss batch the step trained on
        rolled.append(rollouts(batch))
        return rolled[-1]

    obj.rollouts = spy
    torch.manual_seed(0)
    _, st = obj.grpo({"items": items})
    labels = rolled[0][0]["labels"]
    want = []
    for b in range(labels.shape[0]):
        text = tok.decode(labels[b][labels[b] != IGNORE].tolist(), skip_special_tokens=False).replace("<|im_end|>", "")
        want.append(rewards_of(text, items[b // G].extra["reference"], {"correct": 1.0, "consistency": 0.5}))
    assert st["_weight"] == len(want) == len(items) * G
    assert abs(st["reward"] - sum(w["total"] for w in want) / len(want)) < 1e-6
    for part in ("correct", "consistency"):
        assert abs(st[f"reward_{part}"] - sum(w[part] for w in want) / len(want)) < 1e-9


def test_tempered_token_logps_equal_trls_selective_log_softmax():
    """GRPO scores completions under the temperature they were sampled at, as TRL does; at
    temperature 1 it is the model's own token log-probs (cross entropy)."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import selective_log_softmax

    from reelforge.training.losses import tempered_token_logps

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = -100
    keep = labels != -100
    for t in (0.3, 0.7, 1.0, 1.6):
        ours = tempered_token_logps(logits, labels, t)
        theirs = selective_log_softmax(logits, labels.clamp(min=0), temperature=t)
        assert torch.allclose(ours[keep], theirs[keep], atol=1e-5) and (ours[~keep] == 0).all()
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view(2, 7)
    assert torch.allclose(tempered_token_logps(logits, labels, 1.0), -nll, atol=1e-5)
    assert not torch.allclose(tempered_token_logps(logits, labels, 0.5)[keep], -nll[keep], atol=1e-2)
