"""Loss gradients equal hand-derived float64 formulas; reward normalisation matches its definition."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl_megatron.algorithms.advantages import batch_normalized, gae, group_normalized, whiten
from flowrl_megatron.algorithms.losses import LossInputs, policy_loss, value_loss
from flowrl_megatron.config import AlgorithmConfig


def random_inputs(seed: int = 0, b: int = 6, s: int = 9) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[:, 0] = False
    mask[:, 1] = True
    # Old log-probs close to the current ones so that sequence weights fall on both sides of the clip range.
    old = lp + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.08
    return LossInputs(
        logprobs=lp.requires_grad_(True),
        entropy=torch.rand(b, s, generator=g, dtype=torch.float64),
        old_logprobs=old,
        ref_logprobs=-torch.rand(b, s, generator=g, dtype=torch.float64) * 3,
        response_mask=mask,
        advantages=torch.randn(b, generator=g, dtype=torch.float64),
        log_z=torch.randn(b, generator=g, dtype=torch.float64).requires_grad_(True),
    )


def geometric_mean_ratio(x: LossInputs) -> torch.Tensor:
    m = x.response_mask.double()
    return torch.exp(((x.logprobs.detach() - x.old_logprobs) * m).sum(-1) / m.sum(-1))


@pytest.mark.parametrize("variant", ["clip", "cap", "none", "mask"])
def test_flowrl_gradient_matches_hand_derivation(variant):
    cfg = AlgorithmConfig(name="flowrl", importance_weight=variant, beta=15.0, clip_eps=0.2, weight_cap=1.05,
                          mask_eps=0.03)
    x = random_inputs()
    total, count, stats = policy_loss(cfg, x)
    (total / count).backward()

    m = x.response_mask.double()
    n = m.sum(-1)
    lp, old, ref = x.logprobs.detach(), x.old_logprobs, x.ref_logprobs
    residual = x.log_z.detach() + (lp * m).sum(-1) / n - 15.0 * x.advantages - (ref * m).sum(-1) / n
    w = torch.exp(((lp - old) * m).sum(-1))
    geo = geometric_mean_ratio(x)
    kept = ((geo >= 0.97) & (geo <= 1.03)).double()
    w = {"clip": w.clamp(0.8, 1.2), "cap": w.clamp(max=1.05), "none": w, "mask": w.clamp(0.8, 1.2) * kept}[variant]
    if variant == "mask":  # meaningful only if some sequences were dropped and some kept
        assert 0 < kept.sum() < len(kept)
        assert stats["seq/mask_fraction"].item() == (1 - kept).sum().item()
    N = lp.shape[0]
    want_lp = (2 / N) * (w * residual / n).unsqueeze(-1) * m  # d/d logp_it, the weight is a constant
    want_z = (2 / N) * w * residual
    assert torch.allclose(x.logprobs.grad, want_lp, atol=1e-12, rtol=0)
    assert torch.allclose(x.log_z.grad, want_z, atol=1e-12, rtol=0)
    assert torch.allclose(total / count, (w * residual**2).mean(), atol=1e-12)
    if variant == "clip":  # the test is only meaningful if some weights were clipped and some were not
        raw = torch.exp(((lp - old) * m).sum(-1))
        assert ((raw < 0.8) | (raw > 1.2)).any() and ((raw >= 0.8) & (raw <= 1.2)).any()


@pytest.mark.parametrize("name", ["grpo", "reinforce_pp"])
@pytest.mark.parametrize(("kl_coef", "mask"), [(0.0, False), (0.05, False), (0.0, True)])
def test_clipped_surrogate_gradient_matches_hand_derivation(name, kl_coef, mask):
    cfg = AlgorithmConfig(name=name, clip_eps=0.05, kl_coef=kl_coef, importance_weight="mask" if mask else "clip",
                          mask_eps=0.03)
    x = random_inputs(seed=1)
    total, count, _ = policy_loss(cfg, x)
    (total / count).backward()
    geo = geometric_mean_ratio(x)
    kept = ((geo >= 0.97) & (geo <= 1.03)).double() if mask else torch.ones_like(geo)
    if mask:
        assert 0 < kept.sum() < len(kept)

    m = x.response_mask.double()
    lp, old, ref = x.logprobs.detach(), x.old_logprobs, x.ref_logprobs
    ratio = torch.exp(lp - old)
    a = x.advantages.unsqueeze(-1)
    clipped_active = ((a > 0) & (ratio > 1.05)) | ((a < 0) & (ratio < 0.95))
    grad = torch.where(clipped_active, torch.zeros_like(ratio), -a * ratio) * kept.unsqueeze(-1)
    grad = grad + kl_coef * (1 - torch.exp(ref - lp))
    want = grad * m / m.sum()
    assert clipped_active[m.bool()].any() and (~clipped_active[m.bool()]).any()
    assert torch.allclose(x.logprobs.grad, want, atol=1e-12, rtol=0)
    assert count.item() == int(m.sum().item())


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_clip_higher_clips_each_side_at_its_own_range(name):
    """DAPO's clip-higher: ratios above 1 + clip_eps_high and below 1 - clip_eps stop the gradient, each side at
    its own range (checked on the per-token ratio for GRPO and on the sequence ratio for GSPO)."""
    low, high = 0.02, 0.06
    cfg = AlgorithmConfig(name=name, clip_eps=low, clip_eps_high=high)
    assert (cfg.clip_low, cfg.clip_high) == (low, high)
    x = random_inputs(seed=3)
    total, count, _ = policy_loss(cfg, x)
    (total / count).backward()
    m = x.response_mask.double()
    lp, old, a = x.logprobs.detach(), x.old_logprobs, x.advantages
    if name == "grpo":
        ratio, adv, scale = torch.exp(lp - old), a.unsqueeze(-1), m / m.sum()
    else:
        ratio = torch.exp(((lp - old) * m).sum(-1) / m.sum(-1))
        adv, scale = a, None
    up, down = (adv > 0) & (ratio > 1 + high), (adv < 0) & (ratio < 1 - low)
    between_high = (adv > 0) & (ratio > 1 + low) & (ratio <= 1 + high)  # clipped by a symmetric low range only
    assert up.any() or down.any()
    assert between_high.any()  # the asymmetry matters for this batch
    if name == "grpo":
        want = torch.where(up | down, torch.zeros_like(ratio), -adv * ratio) * scale
    else:
        per_seq = torch.where(up | down, torch.zeros_like(ratio), -adv * ratio) / len(ratio)
        want = (per_seq / m.sum(-1)).unsqueeze(-1) * m
    assert torch.allclose(x.logprobs.grad, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mask", [False, True])
def test_gspo_gradient_matches_hand_derivation(mask):
    """GSPO: loss_i = -min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i), s_i = exp(mean_t log pi/pi_old), mean over
    sequences; d loss_i / d log pi_it = -A_i s_i / |y_i| where the clip is not active."""
    cfg = AlgorithmConfig(name="gspo", importance_weight="mask" if mask else "clip", mask_eps=0.03)
    assert (cfg.clip_low, cfg.clip_high) == (3e-4, 4e-4)  # the GSPO paper's ranges, its default here
    x = random_inputs(seed=4)
    with torch.no_grad():  # sequence ratios within a few 1e-4 of 1, on both sides of the clip range
        x.old_logprobs = x.logprobs.detach() + torch.randn(x.logprobs.shape[0], 1, dtype=torch.float64,
                                                          generator=torch.Generator().manual_seed(5)) * 4e-4
        if mask:
            x.old_logprobs[:2] += 0.1  # two sequences leave the mask band
    total, count, stats = policy_loss(cfg, x)
    (total / count).backward()
    m = x.response_mask.double()
    n = m.sum(-1)
    s = geometric_mean_ratio(x)
    a = x.advantages
    active = ((a > 0) & (s > 1 + 4e-4)) | ((a < 0) & (s < 1 - 3e-4))
    assert active.any() and (~active).any()
    kept = ((s >= 0.97) & (s <= 1.03)).double() if mask else torch.ones_like(s)
    if mask:
        assert kept.sum() == len(kept) - 2 and stats["seq/mask_fraction"].item() == 2
    per_seq = torch.where(active, torch.zeros_like(s), -a * s) * kept / len(s)
    want = (per_seq / n).unsqueeze(-1) * m
    assert torch.allclose(x.logprobs.grad, want, atol=1e-12, rtol=0)
    assert count.item() == len(s)
    loss = -torch.minimum(s * a, s.clamp(1 - 3e-4, 1 + 4e-4) * a) * kept
    assert torch.allclose(total / count, loss.mean(), atol=1e-12)


@pytest.mark.parametrize("name", ["flowrl", "grpo", "gspo"])
def test_samples_left_out_of_the_loss_add_nothing_to_it_or_its_average(name):
    """Overlong filtering (``keep``): the loss and gradient equal those of the batch without the left-out samples."""
    cfg = AlgorithmConfig(name=name)
    x = random_inputs(seed=6)
    keep = torch.tensor([True, False, True, True, False, True])
    total, count, _ = policy_loss(cfg, LossInputs(**{**x.__dict__, "keep": keep}))
    (total / count).backward()
    grad_lp, grad_z = x.logprobs.grad.clone(), x.log_z.grad
    sub = random_inputs(seed=6)
    rows = keep.nonzero().squeeze(1)
    only = LossInputs(**{k: (v.detach()[rows].requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                         for k, v in sub.__dict__.items()})
    t2, c2, _ = policy_loss(cfg, only)
    (t2 / c2).backward()
    assert count.item() == c2.item() and torch.allclose(total / count, t2 / c2, atol=1e-12)
    assert torch.allclose(grad_lp[rows], only.logprobs.grad, atol=1e-12) and (grad_lp[~keep] == 0).all()
    if name == "flowrl":  # the only loss with log Z
        assert torch.allclose(grad_z[rows], only.log_z.grad, atol=1e-12) and (grad_z[~keep] == 0).all()


def test_overlong_penalty_is_dapos_linear_ramp():
    from flowrl_megatron.algorithms.advantages import overlong_penalty

    lengths = torch.tensor([10, 60, 61, 80, 100])
    got = overlong_penalty(lengths, max_tokens=100, buffer=40, penalty=0.5)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5 / 40, -0.5 * 20 / 40, -0.5]))
    assert (overlong_penalty(lengths, 100, 0, 1.0) == 0).all()


def test_flowrl_loss_vanishes_at_its_target():
    """If log pi - log pi_ref = beta * r_hat - log Z per token, every residual is 0."""
    x = random_inputs(seed=2)
    with torch.no_grad():
        x.logprobs.copy_(x.ref_logprobs + (15.0 * x.advantages - x.log_z).unsqueeze(-1))
    x.old_logprobs = x.logprobs.detach().clone()
    total, _, stats = policy_loss(AlgorithmConfig(), x)
    assert total.item() == pytest.approx(0.0, abs=1e-18)
    assert stats["seq/importance_weight"].item() == pytest.approx(x.logprobs.shape[0])


def test_log_z_gap_is_log_z_minus_each_groups_best_value():
    """Per group, the log Z that zeroes the mean residual is log Z - mean(residual); the stats carry each group's
    residual sum and size, from which the trainer reports the mean |gap| over groups."""
    x = random_inputs(seed=3)
    x.group_ids, x.groups = torch.tensor([0, 0, 1, 1, 1, 2]), 3
    _, _, stats = policy_loss(AlgorithmConfig(), x)
    m = x.response_mask.double()
    residual = (x.log_z.detach() + (x.logprobs.detach() * m).sum(-1) / m.sum(-1) - 15.0 * x.advantages
                - (x.ref_logprobs * m).sum(-1) / m.sum(-1))
    for g in range(3):
        best = x.log_z.detach()[x.group_ids == g] - residual[x.group_ids == g].mean()  # zeroes the group's residual
        gap = stats["grp/residual"][g] / stats["grp/count"][g]
        assert torch.allclose(x.log_z.detach()[x.group_ids == g] - best, gap.expand(int(stats["grp/count"][g])))


def test_group_normalization():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 2.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3])
    r_hat = group_normalized(rewards, groups)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std(unbiased=True).item()  # unbiased: sqrt(1/3)
    assert std0 == pytest.approx(math.sqrt(1 / 3))
    unit = 0.5 / (std0 + 1e-6)
    assert r_hat[:4].tolist() == pytest.approx([unit, -unit, -unit, unit])
    assert r_hat[4:6].tolist() == [0.0, 0.0]  # all equal: no signal
    assert r_hat[6].item() == pytest.approx(-0.75 / (math.sqrt(1.125) + 1e-6))
    assert r_hat[8].item() == 0.0  # a group of one


def test_batch_normalization():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    want = (r - r.mean()) / (r.std(unbiased=True) + 1e-6)
    assert torch.allclose(batch_normalized(r), want)
    assert batch_normalized(torch.ones(4)).tolist() == [0.0] * 4


def test_flowrl_without_log_z_is_a_clear_error():
    x = random_inputs()
    x.log_z = None
    with pytest.raises(ValueError, match="FlowRL needs log Z"):
        policy_loss(AlgorithmConfig(), x)


def response_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows whose responses start and end at different positions; rewards and values in float64."""
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 2:7], mask[1, 1:3], mask[2, 4:8] = True, True, True
    g = torch.Generator().manual_seed(7)
    return torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64), torch.randn(3, 8, generator=g,
                                                                            dtype=torch.float64), mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.0), (0.9, 0.8)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the response, delta_t = r_t + gamma V_{t+1} - V_t with the reward at
    the last response token and V = 0 after it; written out per row here, against the vectorised backward pass."""
    rewards, values, mask = response_rows()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        pos = mask[i].nonzero().squeeze(1).tolist()
        v = [values[i, t].item() for t in pos] + [0.0]
        r = [0.0] * (len(pos) - 1) + [rewards[i].item()]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(pos))]
        for k, t in enumerate(pos):
            want = sum((gamma * lam) ** j * delta[k + j] for j in range(len(pos) - k))
            assert adv[i, t].item() == pytest.approx(want, abs=1e-12)
            assert ret[i, t].item() == pytest.approx(want + v[k], abs=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    if (gamma, lam) == (1.0, 1.0):  # outcome-reward PPO's default: the advantage is the reward minus the value
        assert torch.allclose(adv, (rewards[:, None] - values) * mask, atol=1e-12)
        assert torch.allclose(ret, rewards[:, None].expand_as(values) * mask, atol=1e-12)


def test_whitening_gives_mean_zero_unit_variance_over_the_masked_tokens():
    _, values, mask = response_rows()
    out = whiten(values, mask)
    kept = out[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (out[~mask] == 0).all()
    assert torch.allclose(kept, (values[mask] - values[mask].mean()) / (values[mask].var() + 1e-8).sqrt())


def test_value_loss_gradient_matches_hand_derivation():
    """0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), token-mean: d/dV = (V - R) / N where the free term is the
    larger (or they tie), 0 where the clipped one is larger and the clip is active."""
    _, old, mask = response_rows()
    g = torch.Generator().manual_seed(8)
    returns = torch.randn(3, 8, generator=g, dtype=torch.float64)
    values = (old + torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.6).requires_grad_(True)
    c = 0.5
    total, count, stats = value_loss(c, values, old, returns, mask)
    (total / count).backward()
    v = values.detach()
    clipped = old + (v - old).clamp(-c, c)
    free, held = (v - returns) ** 2, (clipped - returns) ** 2
    clip_wins = held > free  # only possible where the clip moved the value
    m = mask.double()
    want = torch.where(clip_wins, torch.zeros_like(v), v - returns) * m / m.sum()
    assert clip_wins[mask].any() and (~clip_wins[mask]).any()
    assert torch.allclose(values.grad, want, atol=1e-12, rtol=0)
    assert count.item() == int(m.sum()) and stats["tok/value_clip_fraction"].item() == clip_wins[mask].sum().item()
    assert (total / count).item() == pytest.approx((0.5 * torch.maximum(free, held) * m).sum().item() / m.sum().item())


def test_ppo_surrogate_takes_per_token_advantages():
    """PPO's policy loss is the clipped token surrogate with A_t per token: d/d log pi_t = -A_t ratio_t / N where the
    clip is not active."""
    cfg = AlgorithmConfig(name="ppo", clip_eps=0.05)
    assert cfg.normalization == "none" and cfg.needs_critic and not cfg.needs_log_z
    x = random_inputs(seed=9)
    adv = torch.randn(x.logprobs.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = LossInputs(**{**x.__dict__, "advantages": adv})
    total, count, _ = policy_loss(cfg, x)
    (total / count).backward()
    m = x.response_mask.double()
    ratio = torch.exp(x.logprobs.detach() - x.old_logprobs)
    active = ((adv > 0) & (ratio > 1.05)) | ((adv < 0) & (ratio < 0.95))
    assert active[m.bool()].any() and (~active[m.bool()]).any()
    want = torch.where(active, torch.zeros_like(ratio), -adv * ratio) * m / m.sum()
    assert torch.allclose(x.logprobs.grad, want, atol=1e-12, rtol=0)
