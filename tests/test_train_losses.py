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
