"""Aggregation rules on hand-made state dicts, and update validation."""

from __future__ import annotations

import pytest
import torch

from llmrec.federated.rules import RULES, build_rule, stacked_delta, unit_rows
from llmrec.federated.validation import update_problems

MODULES = ["m.layers.0.q_proj", "m.layers.0.v_proj"]


def lora_state(seed: int, r: int = 2, d_in: int = 5, d_out: int = 3, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.lora_A.weight"] = torch.randn(r, d_in, generator=g, dtype=dtype)
        state[f"{module}.lora_B.weight"] = torch.randn(d_out, r, generator=g, dtype=dtype)
    return state


def fedlora_state(seed: int, r: int = 2, d_in: int = 5, d_out: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.lora_A_direction"] = torch.randn(r, d_in, generator=g)
        state[f"{module}.lora_A_magnitude"] = torch.randn(r, generator=g)
        state[f"{module}.lora_B_direction"] = torch.randn(d_out, r, generator=g)
        state[f"{module}.lora_B_magnitude"] = torch.randn(d_out, generator=g)
    return state


def test_every_rule_builds_and_says_what_it_shares():
    shared = {name: build_rule(name).uploads for name in RULES}
    assert shared == {
        "fedlora_opt": {"A_direction", "A_magnitude", "B_direction"},
        "fedit": {"A", "B"}, "ffa": {"B"}, "fedsa": {"A"}, "flora": {"A", "B"}, "local": set(),
    }
    assert {name for name in RULES if build_rule(name).personal} == {"fedlora_opt", "fedsa", "local"}


def test_fedit_averages_a_and_b_by_example_counts():
    updates = [lora_state(1), lora_state(2), lora_state(3)]
    weights = [10, 30, 60]
    new = build_rule("fedit").aggregate(updates, weights, {})
    for name in updates[0]:
        expected = 0.1 * updates[0][name] + 0.3 * updates[1][name] + 0.6 * updates[2][name]
        torch.testing.assert_close(new[name], expected, rtol=0, atol=1e-12)


def test_flora_stacking_reproduces_the_weighted_sum_of_products_exactly():
    scaling = 2.0
    rule = build_rule("flora", scaling=scaling)
    updates = [lora_state(1), lora_state(2, r=2), lora_state(3)]
    weights = [1, 2, 5]
    p = [w / 8 for w in weights]
    stack = rule.aggregate(updates, weights, {})
    deltas = stacked_delta(stack)
    for module in MODULES:
        A, B = stack[f"{module}.lora_A.weight"], stack[f"{module}.lora_B.weight"]
        assert A.shape == (6, 5) and B.shape == (3, 6)  # rank 3 clients x 2
        expected = sum(pk * scaling * u[f"{module}.lora_B.weight"] @ u[f"{module}.lora_A.weight"]
                       for pk, u in zip(p, updates))
        torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(deltas[module], expected, rtol=0, atol=1e-12)
    # the next round appends to the stack: the global update is the sum over rounds
    later = rule.aggregate([lora_state(4)], [1], stack)
    module = MODULES[0]
    round_two = scaling * lora_state(4)[f"{module}.lora_B.weight"] @ lora_state(4)[f"{module}.lora_A.weight"]
    torch.testing.assert_close(stacked_delta(later)[module], deltas[module] + round_two, rtol=0, atol=1e-12)


def test_fedsa_never_uploads_b_and_ffa_never_uploads_or_trains_a():
    state = lora_state(0)
    fedsa, ffa = build_rule("fedsa"), build_rule("ffa")
    assert all(name.endswith("lora_A.weight") for name in fedsa.upload(state))
    assert all(name.endswith("lora_B.weight") for name in fedsa.private(state))
    assert all(name.endswith("lora_B.weight") for name in ffa.upload(state))
    assert ffa.frozen == {"A"}
    new = ffa.aggregate([ffa.upload(lora_state(1)), ffa.upload(lora_state(2))], [1, 1], {})
    assert set(new) == {f"{m}.lora_B.weight" for m in MODULES}


def test_fedlora_optimizer_never_uploads_b_magnitudes_and_averages_unit_directions():
    rule = build_rule("fedlora_opt")
    state = fedlora_state(0)
    upload = rule.upload(state)
    assert upload and not any(name.endswith("lora_B_magnitude") for name in upload)
    assert set(rule.private(state)) == {f"{m}.lora_B_magnitude" for m in MODULES}
    updates = [rule.upload(fedlora_state(1)), rule.upload(fedlora_state(2))]
    # scaling a client's stored direction rows must not change its say in the average
    scaled = {name: (t * 7.0 if name.endswith("direction") else t) for name, t in updates[1].items()}
    new = rule.aggregate(updates, [1, 3], {})
    assert all(torch.allclose(new[n], t) for n, t in rule.aggregate([updates[0], scaled], [1, 3], {}).items())
    for module in MODULES:
        name = f"{module}.lora_A_direction"
        expected = unit_rows(0.25 * unit_rows(updates[0][name]) + 0.75 * unit_rows(updates[1][name]))
        torch.testing.assert_close(new[name], expected)
        torch.testing.assert_close(new[name].norm(dim=1), torch.ones(2))
        magnitude = f"{module}.lora_A_magnitude"
        torch.testing.assert_close(new[magnitude], 0.25 * updates[0][magnitude] + 0.75 * updates[1][magnitude])


def test_local_only_shares_nothing_and_keeps_the_global_state():
    rule = build_rule("local")
    assert rule.upload(lora_state(0)) == {}
    previous = {"x.lora_A.weight": torch.ones(1, 1)}
    assert rule.aggregate([{}, {}], [1, 1], previous) == previous


@pytest.mark.parametrize("poison, reason", [
    ("nan", "non-finite"), ("shape", "shape"), ("norm", "exceeds the bound"), ("dtype", "dtype"),
    ("missing", "missing"), ("extra", "unexpected"),
])
def test_a_poisoned_update_is_rejected_with_its_reason(poison, reason):
    expected = {k: v.float() for k, v in lora_state(0).items()}
    update = {k: v + 0.01 for k, v in expected.items()}
    name = sorted(update)[0]
    if poison == "nan":
        update[name] = update[name].clone()
        update[name][0, 0] = float("nan")
    elif poison == "shape":
        update[name] = torch.zeros(3, 3)
    elif poison == "norm":
        update[name] = update[name] * 1e6
    elif poison == "dtype":
        update[name] = update[name].double()
    elif poison == "missing":
        del update[name]
    else:
        update["extra.lora_A.weight"] = torch.zeros(1)
    problems = update_problems(update, expected, expected, max_norm=10.0)
    assert problems and reason in " ".join(problems)
    assert update_problems({k: v + 0.01 for k, v in expected.items()}, expected, expected, max_norm=10.0) == []
