"""The alignment math against closed forms worked by hand; the arithmetic is in the comments."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from neuraflux.alignment import (
    DPO_LOSS_TYPES,
    IGNORE_INDEX,
    AdaptiveKLController,
    FixedKLController,
    LossOutput,
    dpo_loss,
    gae,
    kl_penalty,
    leave_one_out_baseline,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_logprobs,
    reward_loss,
    sequence_logprobs,
    token_logprobs,
)
from tests.conftest import grads_of, small_lm  # noqa: E402

LOG2 = math.log(2.0)


def t(*xs, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.expand_as(actual), atol=atol, rtol=0)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_sum_ignore_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    # whole tensor: (1 + 2 + 4 + 6) / 4 = 3.25; per row: 3 / 2 = 1.5 and 10 / 2 = 5
    close(masked_mean(x, mask), 3.25)
    close(masked_mean(x, mask, dim=-1), [1.5, 5.0])
    close(masked_sum(x, mask, dim=-1), [3.0, 10.0])


def test_masked_mean_of_a_fully_padded_row_is_zero_not_nan():
    x = torch.tensor([[1.0, 3.0], [7.0, 9.0]])
    mask = torch.tensor([[True, True], [False, False]])
    close(masked_mean(x, mask, dim=-1), [2.0, 0.0])


def test_masked_var_biased_and_unbiased_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # mean 2; squared deviations 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(masked_var(x, mask), 1.0)


def test_masked_whiten_uses_only_valid_positions_and_zeroes_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased std 1 -> (x - 2) / 1
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-5)
    # shift_mean=False only rescales: (x - 2) / 1 + 2 = x on valid positions
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-5)


def test_masks_must_be_bool_and_match_the_values_shape():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="mask must be a bool tensor.*float32"):
        masked_mean(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\) but the values have shape \(2, 3\)"):
        masked_mean(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 valid positions.*the mask has 1"):
        masked_var(torch.zeros(3), torch.tensor([True, False, False]))


# ---------------------------------------------------------------- log-probs


def test_token_logprobs_equals_log_softmax_gather_and_ignores_padding_ids():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    manual = F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, labels)
    close(got, manual.detach(), atol=1e-5)
    # same gradient as the textbook form
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_manual,) = torch.autograd.grad(manual.sum(), logits)
    close(g_got, g_manual, atol=1e-5)
    # the ignore index and out-of-vocabulary ids at padded positions must not raise; -100 gives 0
    padded = labels.clone()
    padded[0, 3:] = IGNORE_INDEX
    padded[1, 4] = 10_000
    got = token_logprobs(logits, padded)
    assert torch.isfinite(got).all()
    close(got[0, 3:], 0.0)
    close(got[:, :3], manual[:, :3].detach(), atol=1e-5)


def test_token_logprobs_bf16_logits_give_float32_close_to_float32_math():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 4))
    got = token_logprobs(logits, labels)
    assert got.dtype == torch.float32
    manual = F.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(got, manual, atol=1e-5)


def test_sequence_logprobs_sum_and_average_against_manual_gather():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6)
    labels = torch.randint(0, 6, (2, 4))
    labels[1, 0] = IGNORE_INDEX  # a prompt position of the second row
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    per_token = F.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    # row 0 counts tokens 0..2, row 1 tokens 1..3
    expected_sum = torch.stack([per_token[0, :3].sum(), per_token[1, 1:].sum()])
    close(sequence_logprobs(logits, labels, mask), expected_sum, atol=1e-5)
    close(sequence_logprobs(logits, labels, mask, average=True), expected_sum / 3, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_response_logprobs_equals_sequence_logprobs_of_the_full_logits(average):
    torch.manual_seed(3)
    model = small_lm(40, 12)
    ids, labels = torch.randint(0, 40, (3, 10)), torch.randint(0, 40, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 6:] = True
    mask[2, 2:9] = True  # row 1: no response token, log-prob 0 in both forms
    attention_mask = torch.ones(3, 10, dtype=torch.bool)
    attention_mask[2, :2] = False
    full = sequence_logprobs(model(ids, attention_mask), labels, mask, average=average)
    full_grads = grads_of(model, full.sum())
    picked = response_logprobs(model, ids, labels, mask, average=average, attention_mask=attention_mask)
    picked_grads = grads_of(model, picked.sum())
    torch.testing.assert_close(picked, full, rtol=1e-5, atol=1e-6)
    assert picked[1].item() == 0.0
    for n, g in full_grads.items():
        torch.testing.assert_close(picked_grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    none = response_logprobs(model, ids, labels, torch.zeros_like(mask))
    none.sum().backward()  # a batch without response tokens: zeros, and backward still runs
    assert none.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="bool"):
        response_logprobs(model, ids, labels, mask.long())


def test_token_logprobs_rejects_misaligned_labels():
    with pytest.raises(ValueError, match=r"labels have shape \(2, 3\) but logits are \(2, 4, 5\)"):
        token_logprobs(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        token_logprobs(torch.zeros(2, 4, 5), torch.zeros(2, 4))


# ---------------------------------------------------------------- DPO family


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        ("sigmoid", 0.0, LOG2),  # -log sigma(0) = log 2
        ("sigmoid", 0.2, LOG2),  # cDPO: 0.8 log 2 + 0.2 log 2
        ("hinge", 0.0, 1.0),  # relu(1 - 0)
        ("ipo", 0.0, 25.0),  # (0 - 1 / (2 * 0.1))^2 = 5^2 = 1 / (4 beta^2)
        ("robust", 0.2, LOG2),  # (0.8 log 2 - 0.2 log 2) / (1 - 0.4) = 0.6 log 2 / 0.6
    ],
)
def test_dpo_at_zero_logits_when_policy_equals_reference(loss_type, smoothing, expected):
    logps = t(-3.0, -7.5)
    out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    close(out.losses, expected)
    close(out.chosen_rewards, 0.0)
    close(out.rejected_rewards, 0.0)


# Two pairs, beta = 0.5, h = (pi_c - pi_r) - (ref_c - ref_r):
#   row 0: pi_c=-1, pi_r=-3, ref_c=ref_r=-2 -> h = 2 - 0 = 2,  beta h = 1
#   row 1: pi_c=-2, pi_r=-1, ref_c=ref_r=-2 -> h = -1 - 0 = -1, beta h = -0.5
PC, PR, RC, RR = t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0)
LS1, LSM1 = -math.log1p(math.exp(-1.0)), -math.log1p(math.exp(1.0))  # log sigma(1), log sigma(-1)
LSH, LSMH = -math.log1p(math.exp(-0.5)), -math.log1p(math.exp(0.5))  # log sigma(0.5), log sigma(-0.5)


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        # -log sigma(1) = 0.31326, -log sigma(-0.5) = 0.97408
        ("sigmoid", 0.0, [-LS1, -LSMH]),
        # cDPO eps=0.2: 0.8 * 0.31326 + 0.2 * 1.31326 = 0.51326; 0.8 * 0.97408 + 0.2 * 0.47408 = 0.87408
        ("sigmoid", 0.2, [-0.8 * LS1 - 0.2 * LSM1, -0.8 * LSMH - 0.2 * LSH]),
        # relu(1 - 1) = 0; relu(1 + 0.5) = 1.5
        ("hinge", 0.0, [0.0, 1.5]),
        # 1 / (2 beta) = 1: (2 - 1)^2 = 1; (-1 - 1)^2 = 4
        ("ipo", 0.0, [1.0, 4.0]),
        # (0.8 * 0.31326 - 0.2 * 1.31326) / 0.6 = -0.02007; (0.8 * 0.97408 - 0.2 * 0.47408) / 0.6 = 1.14074
        ("robust", 0.2, [(-0.8 * LS1 + 0.2 * LSM1) / 0.6, (-0.8 * LSMH + 0.2 * LSH) / 0.6]),
    ],
)
def test_dpo_hand_worked_nonzero_case(loss_type, smoothing, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    close(out.losses, expected)
    # rewards: 0.5 * (pi - ref) -> chosen [0.5, 0], rejected [-0.5, 0.5]
    close(out.chosen_rewards, [0.5, 0.0])
    close(out.rejected_rewards, [-0.5, 0.5])


def test_dpo_spot_values_match_the_hand_arithmetic():
    # the decimals quoted in the comments above, so a typo in a formula cannot hide behind the same typo twice
    close(
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.2).losses,
        [-0.0200716, 1.1407437],
    )
    close(dpo_loss(PC, PR, RC, RR, beta=0.5).losses, [0.3132617, 0.9740770])
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2).losses, [0.5132617, 0.8740770])


def test_dpo_gradients_reach_policy_logps_only():
    policy_c, policy_r = t(-2.0, -4.0).requires_grad_(), t(-3.0, -1.0).requires_grad_()
    ref_c, ref_r = t(-2.0, -4.0).requires_grad_(), t(-3.0, -1.0).requires_grad_()
    out = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    out.losses.sum().backward()
    # d/d pi_c of -log sigma(beta h) = -beta sigma(-beta h) = -0.1 * 0.5 at h = 0; pi_r gets the opposite sign
    close(policy_c.grad, -0.05)
    close(policy_r.grad, 0.05)
    assert ref_c.grad is None and ref_r.grad is None
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_rejects_bad_settings_with_the_allowed_values():
    x = t(0.0)
    with pytest.raises(
        ValueError, match=r"loss_type must be one of \['sigmoid', 'hinge', 'ipo', 'robust'\], got 'kto'"
    ):
        dpo_loss(x, x, x, x, loss_type="kto")
    assert DPO_LOSS_TYPES == ("sigmoid", "hinge", "ipo", "robust")
    for bad in (0.5, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            dpo_loss(x, x, x, x, label_smoothing=bad)
    with pytest.raises(ValueError, match="label_smoothing only applies to 'sigmoid' and 'robust', not 'ipo'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(
        ValueError, match=r"ref_rejected_logps has shape \(2,\) but policy_chosen_logps has shape \(1,\)"
    ):
        dpo_loss(x, x, x, t(0.0, 0.0))


# ---------------------------------------------------------------- reward model


def test_reward_loss_bradley_terry_with_and_without_margin():
    close(reward_loss(t(1.5, -2.0), t(1.5, -2.0)), LOG2)  # -log sigma(0)
    # margin 1: scores 2 vs 1 -> -log sigma(2 - 1 - 1) = log 2; scores 3 vs 1 -> -log sigma(1) = 0.31326
    got = reward_loss(t(2.0, 3.0), t(1.0, 1.0), margin=t(1.0, 1.0))
    close(got, [LOG2, math.log1p(math.exp(-1.0))])


# ---------------------------------------------------------------- GAE

# gamma = 0.9, lam = 0.8 (gamma lam = 0.72), rewards [0, 0, 1], values [0.5, 0.4, 0.3], value after the end 0:
#   t=2: delta = 1 + 0.9 * 0   - 0.3 =  0.7;   A2 = 0.7
#   t=1: delta = 0 + 0.9 * 0.3 - 0.4 = -0.13;  A1 = -0.13 + 0.72 * 0.7   = 0.374
#   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14;  A0 = -0.14 + 0.72 * 0.374 = 0.12928
#   returns = A + V = [0.62928, 0.774, 1.0]
GAMMA, LAM = 0.9, 0.8
R3, V3 = [0.0, 0.0, 1.0], [0.5, 0.4, 0.3]
A3, RET3 = [0.12928, 0.374, 0.7], [0.62928, 0.774, 1.0]


def test_gae_three_step_hand_worked():
    out = gae(t(*R3).unsqueeze(0), t(*V3).unsqueeze(0), torch.ones(1, 3, dtype=torch.bool), GAMMA, LAM)
    close(out.advantages, [A3])
    close(out.returns, [RET3])


def test_gae_right_left_and_middle_padding_skip_masked_steps():
    pad_r, pad_v = 5.0, 7.0  # garbage in padding must not leak
    rewards = t(
        [*R3, pad_r, pad_r],  # right-padded
        [pad_r, pad_r, *R3],  # left-padded
        [R3[0], pad_r, R3[1], pad_r, R3[2]],  # holes between valid steps
    )
    values = t([*V3, pad_v, pad_v], [pad_v, pad_v, *V3], [V3[0], pad_v, V3[1], pad_v, V3[2]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = gae(rewards, values, mask, GAMMA, LAM)
    close(out.advantages, [[*A3, 0, 0], [0, 0, *A3], [A3[0], 0, A3[1], 0, A3[2]]])
    close(out.returns, [[*RET3, 0, 0], [0, 0, *RET3], [RET3[0], 0, RET3[1], 0, RET3[2]]])


def _gae_reference(rewards: list[float], values: list[float], valid: list[bool], gamma: float, lam: float):
    """The textbook loop over one row's valid steps only, written without tensors."""
    idx = [i for i, v in enumerate(valid) if v]
    adv, ret = [0.0] * len(rewards), [0.0] * len(rewards)
    running, next_value = 0.0, 0.0
    for i in reversed(idx):
        delta = rewards[i] + gamma * next_value - values[i]
        running = delta + gamma * lam * running
        adv[i], ret[i] = running, running + values[i]
        next_value = values[i]
    return adv, ret


def test_gae_matches_a_plain_python_loop_on_random_inputs():
    rng = random.Random(0)
    torch.manual_seed(0)
    rewards, values = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for b in range(6):  # left, right or no padding, with a random valid length
        n = rng.randint(1, 9)
        start = rng.choice([0, 9 - n, rng.randint(0, 9 - n)])
        mask[b, start : start + n] = True
    gamma, lam = 0.95, 0.7
    out = gae(rewards, values, mask, gamma, lam)
    for b in range(6):
        adv, ret = _gae_reference(rewards[b].tolist(), values[b].tolist(), mask[b].tolist(), gamma, lam)
        close(out.advantages[b], adv, atol=1e-10)
        close(out.returns[b], ret, atol=1e-10)


def test_gae_outputs_are_detached_targets():
    values = torch.ones(1, 3, requires_grad=True)
    out = gae(torch.zeros(1, 3), values, torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    logprobs = t([-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0])
    advantages = t([1.0, 2.0, 3.0], [-4.0, 6.0, 100.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    # valid advantages 1, 2, 3, -4, 6 -> mean 8 / 5 = 1.6 -> loss -1.6
    close(out.loss, -1.6)
    close(out.clipfrac, 0.0)
    close(out.approx_kl, 0.0)


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1.2 + 1e-3, 1.0, True),  # A > 0: no credit for pushing the ratio above 1 + eps
        (1.2 - 1e-3, 1.0, False),
        (0.8 - 1e-3, -1.0, True),  # A < 0: no credit for pushing it below 1 - eps
        (0.8 + 1e-3, -1.0, False),
        (0.5, 1.0, False),  # pessimistic side: a worse ratio is never clipped, its gradient stays
        (1.5, -1.0, False),
    ],
)
def test_ppo_clipping_starts_exactly_at_one_plus_minus_eps(ratio, advantage, clipped):
    logprobs = t(math.log(ratio)).requires_grad_()
    out = ppo_policy_loss(logprobs, t(0.0), t(advantage), torch.tensor([True]), clip_range=0.2)
    out.loss.backward()
    close(out.clipfrac, 1.0 if clipped else 0.0)
    # unclipped: d(-A r)/d logp = -A r
    close(logprobs.grad, 0.0 if clipped else -advantage * ratio, atol=1e-9)
    # approx_kl = 0.5 (log r)^2
    close(out.approx_kl, 0.5 * math.log(ratio) ** 2)


def test_ppo_value_loss_clips_around_old_values():
    # clip 0.2 around old value 0, return 1:
    #   V = 0.5 -> clipped 0.2: errors 0.25 vs 0.64 -> 0.64 (clipped branch)
    #   V = 0.1 -> inside: both 0.81, not counted as clipped
    #   V = 9   -> masked out
    values = t(0.5, 0.1, 9.0).requires_grad_()
    mask = torch.tensor([True, True, False])
    out = ppo_value_loss(values, t(0.0, 0.0, 0.0), t(1.0, 1.0, 1.0), mask, clip_range_value=0.2)
    close(out.loss, 0.5 * (0.64 + 0.81) / 2)  # 0.3625
    close(out.clipfrac, 0.5)
    out.loss.backward()
    # the clipped term does not depend on V; the inside one: 0.5 * 2 (V - R) / 2 = 0.5 * (0.1 - 1) = -0.45
    close(values.grad, [0.0, -0.45, 0.0])


def test_ppo_rejects_nonpositive_clip_ranges():
    x, m = t(0.0), torch.tensor([True])
    with pytest.raises(ValueError, match="clip_range must be > 0, got 0"):
        ppo_policy_loss(x, x, x, m, clip_range=0)
    with pytest.raises(ValueError, match="clip_range_value must be > 0, got -1"):
        ppo_value_loss(x, x, x, m, clip_range_value=-1)


# ---------------------------------------------------------------- KL estimators and controllers


def test_kl_estimators_by_hand():
    # p = 0.5, q = 0.25: log p - log q = log 2 = 0.69315; r = q / p = 0.5 -> k3 = -0.5 - log 0.5 = 0.19315
    # p = 0.25, q = 0.5: k1 = -log 2;                      r = 2   -> k3 = 1 - log 2 = 0.30685
    logp, logq = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))
    close(kl_penalty(logp, logq, "k1"), [LOG2, -LOG2])
    close(kl_penalty(logp, logq, "k3"), [-0.5 + LOG2, 1 - LOG2])
    close(kl_penalty(logp, logq, "abs"), [LOG2, LOG2])
    close(kl_penalty(logp, logq, "mse"), [0.5 * LOG2**2, 0.5 * LOG2**2])
    close(kl_penalty(logp, logq, "k3"), [0.1931472, 0.3068528])


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    # E_p[k] summed over a 3-token vocabulary, exactly: both equal sum p log(p / q)
    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.2, 0.6)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        close((p * kl_penalty(p.log(), q.log(), kind)).sum(), exact.item(), atol=1e-12)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \['k1', 'k3', 'abs', 'mse'\], got 'k2'"):
        kl_penalty(t(0.0), t(0.0), "k2")


def test_adaptive_kl_controller_moves_the_right_way_and_clips():
    # target 6, horizon 10000, 100 steps -> multiplier 1 + e * 0.01
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    assert ctl.value == 0.2
    assert ctl.update(current_kl=6.6, n_steps=100) == pytest.approx(0.2 * 1.001)  # e = 0.1
    ctl = AdaptiveKLController(0.2, 6.0, 10_000)
    assert ctl.update(9.0, 100) == pytest.approx(0.2 * 1.002)  # e = 0.5, clipped to 0.2
    ctl = AdaptiveKLController(0.2, 6.0, 10_000)
    assert ctl.update(0.0, 100) == pytest.approx(0.2 * 0.998)  # e = -1, clipped to -0.2
    assert ctl.value == pytest.approx(0.1996)
    with pytest.raises(ValueError, match="AdaptiveKLController target must be > 0, got 0"):
        AdaptiveKLController(0.2, 0, 10_000)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(kl_coef=0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05


# ---------------------------------------------------------------- RLOO


def test_leave_one_out_baseline_by_hand():
    # prompt 1, rewards 1, 2, 3: baselines (2+3)/2=2.5, (1+3)/2=2, (1+2)/2=1.5 -> -1.5, 0, 1.5
    # prompt 2, rewards 4, 4, 4: every baseline is 4 -> 0
    close(leave_one_out_baseline(t(1.0, 2.0, 3.0, 4.0, 4.0, 4.0), k=3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # k = 2: each sample's baseline is the other one -> 1 - 3, 3 - 1
    close(leave_one_out_baseline(t(1.0, 3.0), k=2), [-2.0, 2.0])


def test_leave_one_out_baseline_rejects_bad_k():
    with pytest.raises(ValueError, match="needs k >= 2 samples per prompt, got k=1"):
        leave_one_out_baseline(t(1.0, 2.0), k=1)
    with pytest.raises(ValueError, match="5 rewards is not a positive multiple of k=2"):
        leave_one_out_baseline(torch.zeros(5), k=2)


# ---------------------------------------------------------------- LossOutput


def test_loss_output_checks_scalar_loss_and_metric_names():
    out = LossOutput(torch.tensor(1.0, requires_grad=True) * 2, {"policy/clipfrac": torch.tensor(0.5)})
    assert out.loss.requires_grad and not out.metrics["policy/clipfrac"].requires_grad
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor, got shape \(2,\)"):
        LossOutput(torch.zeros(2))
    with pytest.raises(ValueError, match=r"must look like 'split/name', got \['clipfrac'\]"):
        LossOutput(torch.tensor(0.0), {"clipfrac": torch.tensor(0.0)})
