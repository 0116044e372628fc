"""The load-adaptive policy against hand-made cost models and acceptance histories."""
import pytest

from server.cost_model import StepCostModel
from server.sampling_params import SamplingParams
from server.sequence import Sequence
from server.drafter import Draft
from server.speculation_policy import EXPLORE_EVERY, HOPE_FLOOR, PAUSE_STEPS, SpeculationPolicy
from server.tree import expand_tree

ACCURACIES = [[0.7, 0.15, 0.05], [0.5, 0.1, 0.05], [0.4, 0.08], [0.3, 0.05]]
PATHS = tuple(expand_tree(ACCURACIES, 64))


def seqs(n, skill=1.0, **params):
    out = []
    for i in range(n):
        seq = Sequence(str(i), [1, 2, 3], SamplingParams(max_tokens=100, **{"temperature": 0.0, **params}))
        seq.draft = prior_draft()
        seq.spec.skill = skill
        out.append(seq)
    return out


def prior_draft(tokens=None):
    """A draft whose chances are what the accuracies say (the likeliest tree is the expansion order)."""
    chances = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05}), max_nodes=64).prior_chances
    return Draft(list(tokens) if tokens is not None else [0] * len(PATHS), list(chances))


def policy(costs):
    return SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(costs), max_nodes=64)


def test_cheap_extra_tokens_buy_big_trees_for_a_lone_request():
    flat = policy({1: 0.05, 16: 0.055, 64: 0.07, 256: 0.2, 1024: 0.8})
    assert flat.choose(seqs(1), 0, 1024).sizes[0] >= 12   # 14 nodes give the most tokens per second here


def test_a_busy_batch_drafts_less_than_a_lone_request():
    costs = {1: 0.05, 16: 0.06, 64: 0.1, 256: 0.4, 1024: 1.6}  # compute-bound past ~64 tokens
    alone = policy(costs).choose(seqs(1), 0, 2048).sizes[0]
    busy = policy(costs).choose(seqs(32), 0, 2048).sizes
    assert max(busy) < alone


def test_linear_cost_means_no_speculation():
    linear = policy({1: 0.01, 16: 0.16, 64: 0.64, 256: 2.56})
    assert linear.choose(seqs(8), 0, 1024).sizes == [1] * 8


def test_trees_that_keep_less_than_planned_lower_trust_and_shrink():
    """The plan takes the sequences and nodes whose estimates look best, so what it expects
    of them errs high; what the trees really kept scales every later plan."""
    p = policy({1: 0.05, 4: 0.051, 8: 0.055, 16: 0.06, 64: 0.2, 256: 0.8})
    before = p.choose(seqs(1), 0, 1024).sizes[0]
    for _ in range(200):
        p.record_tree(2.0, 1)
    assert p.trust == pytest.approx(0.5, abs=0.01)
    assert 1 < p.choose(seqs(1), 0, 1024).sizes[0] < before


def test_a_step_the_heads_expected_little_of_moves_the_skill_little():
    """The skill is kept over expected tokens, each a moving average: a miss on a step the
    heads were unsure of says less than a miss on one they were sure of."""
    unsure, sure = seqs(2)
    unsure.spec.record(0, 15, 0.1)
    sure.spec.record(0, 15, 2.0)
    assert sure.spec.skill < unsure.spec.skill < 1.0
    assert unsure.spec.skill > 0.95


def test_heads_that_never_hit_stop_drafting():
    costs = {1: 0.05, 16: 0.06, 64: 0.1, 256: 0.4}
    sequence = seqs(1)[0]
    p = policy(costs)
    for _ in range(30):
        sequence.spec.record(0, 15, 1.2)
    assert p.choose([sequence], 0, 512).sizes[0] <= 2


def test_token_limit_is_respected():
    p = policy({1: 0.05, 16: 0.05, 64: 0.05, 256: 0.05})
    assert sum(p.choose(seqs(10), 0, 40).sizes) <= 40


def test_seeded_sampling_keeps_one_tree_size_whatever_the_load():
    p = policy({1: 0.05, 16: 0.06, 64: 0.1, 256: 0.4, 1024: 1.6})
    seeded = seqs(1, seed=3)[0]
    seeded.params = SamplingParams(max_tokens=100, temperature=0.7, seed=3)
    alone = p.choose([seeded], 0, 1024)
    crowded = p.choose([seeded] + seqs(40), 0, 1024)
    assert alone.sizes[0] == crowded.sizes[0] == p.pinned_size
    assert alone.drafts[0] and crowded.drafts[0] and p.draft_after_prefill(seeded) == p.pinned_size
    # a seeded request that joins a batch whose planning is paused still gets its tree
    p.paused = PAUSE_STEPS
    assert p.choose(seqs(8) + [seeded], 0, 1024).sizes[-1] == p.pinned_size


def test_plain_decoding_plans_nothing():
    """A budget of 1 node, or no heads and no lookups (--no-speculation): every tree the
    root, no drafts and no chains, whatever the costs, seeded sampling requests included."""
    seeded = seqs(1)[0]
    seeded.params = SamplingParams(max_tokens=100, temperature=0.7, seed=3)
    flat = StepCostModel({1: 0.05, 64: 0.05})
    for p in (SpeculationPolicy(PATHS, ACCURACIES, flat, max_nodes=64, fixed_size=1, lookup_tokens=8),
              SpeculationPolicy((), ACCURACIES, flat, max_nodes=64)):
        plan = p.choose([seeded] + seqs(2), 0, 1024)
        assert plan.sizes == [1, 1, 1] and plan.drafts == [0, 0, 0] and plan.lookups == [[], [], []]
        assert not p.speculating


def test_cost_model_interpolates_and_adds_attention_and_drafting():
    model = StepCostModel({1: 0.05, 64: 0.1}, per_key=1e-6, per_tree=0.003, draft_fixed=0.002, draft_per_seq=0.001)
    assert model(32) == pytest.approx(0.05 + 0.05 * 31 / 63)
    assert model(128) > model(64)
    assert model(32, keys=10_000) == pytest.approx(model(32) + 0.01)
    assert model(32, num_drafts=0) == model(32)
    assert model(32, num_drafts=4) == pytest.approx(model(32) + 0.006)
    assert model(32, num_trees=2) == pytest.approx(model(32) + 0.006)


def test_least_slope_is_the_cheapest_extra_token_in_the_range():
    model = StepCostModel({1: 0.02, 4: 0.02, 8: 0.03, 32: 0.06, 64: 0.14})
    assert model.least_slope(1, 64) == 0.0              # flat up to 4 tokens
    assert model.least_slope(4, 64) == pytest.approx(0.03 / 24)   # 8 -> 32 is the flattest part
    assert model.least_slope(8, 64) == pytest.approx(0.03 / 24)
    assert model.least_slope(40, 64) == pytest.approx(0.08 / 32)
    assert model.least_slope(64, 64) == 0.0
    model.offset = -0.05   # a step the model overestimates by far is clamped at a quarter of it
    assert model.least_slope(8, 64) == pytest.approx(0.25 * 0.03 / 24)


def test_the_price_search_stops_where_no_node_can_pay():
    """A compute-bound batch (every token costs as much as the last) takes only nodes likelier
    than a token's cost at the plain rate; a lone request with cheap extra tokens takes many."""
    busy = policy({1: 0.01, 64: 0.64})          # 10 ms a token
    plan = busy.choose(seqs(32), 0, 1024)
    assert all(t.head_paths == () or len(t.head_paths) <= 2 for t in plan.trees)
    lone = policy({1: 0.05, 8: 0.051, 64: 0.06})
    assert lone.choose(seqs(1), 0, 1024).sizes[0] >= 8


def test_a_stalled_measurement_does_not_lift_the_whole_curve():
    model = StepCostModel({1: 2.0, 4: 0.05, 16: 0.06, 64: 0.1})
    assert model(1) == 0.05 and model(64) == 0.1
    assert model(4) <= model(8) <= model(16)


def test_real_steps_move_the_offset_not_the_marginal_costs():
    """A busier machine or per-sequence overheads shift every estimate alike; what one more
    tree token costs stays what was measured."""
    model = StepCostModel({1: 0.05, 64: 0.1}, per_key=1e-6)
    marginal = model(40, 4000) - model(32, 3000)
    for _ in range(200):
        model.observe(32, 3000, 0, 0, 0.2)
    assert model(32, 3000) == pytest.approx(0.2, rel=0.02)
    assert model(40, 4000) - model(32, 3000) == pytest.approx(marginal, rel=0.01)
    model.observe(32, 3000, 0, 0, 100.0)   # one stalled step moves it a bounded amount
    assert model(32, 3000) < 0.26


def test_real_steps_of_two_sizes_correct_a_disturbed_measurement():
    """Start-up timed 4 tokens at 1.3x one (a slow spell); real steps of 1 and 4 tokens say
    1.06x, with 10 ms of overheads the measurement did not see. The model learns both; the
    sizes the steps never ran (16, 64) keep their measured cost plus the average overhead."""
    model = StepCostModel({1: 0.050, 4: 0.065, 16: 0.080, 64: 0.120})
    for k in range(400):
        if k % 3:
            model.observe(4, 0, 0, 0, 0.053 + 0.010)
        else:
            model.observe(1, 0, 0, 0, 0.050 + 0.010)
    assert model(1) == pytest.approx(0.060, abs=0.001)
    assert model(4) == pytest.approx(0.063, abs=0.001)
    assert model(64) == pytest.approx(0.120 + model.offset, abs=0.0005)
    assert model(16) - model(4) > 0.080 - 0.065       # nothing learnt there: the measured step stands


def test_only_sequences_planned_for_a_tree_draft(monkeypatch):
    """Drafting costs time: at a load where trees do not pay, nobody drafts (but every
    EXPLORE_EVERY-th step, to keep the skill current); a sequence without a draft decodes
    plainly and drafts for the next step. (Every step planned: no pauses.)"""
    monkeypatch.setattr("server.speculation_policy.PAUSE_STEPS", 0)
    cheap = policy({1: 0.05, 16: 0.055, 64: 0.07, 256: 0.2, 1024: 0.8})
    (seq,) = seqs(1)
    seq.draft = None
    plan = cheap.choose([seq], 0, 1024)
    assert plan.sizes == [1] and plan.drafts[0] > 1
    linear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.01, 16: 0.16, 64: 0.64, 256: 2.56}),
                               max_nodes=64)
    batch = seqs(8)
    drafts = [linear.choose(batch, 0, 1024).drafts for _ in range(2 * EXPLORE_EVERY)]
    assert not linear.draft_after_prefill(seqs(1)[0])
    # all of them together, every EXPLORE_EVERY steps (a draft call has a fixed cost)
    assert drafts.count([linear.shadow_size] * 8) == 2 and drafts.count([0] * 8) == 2 * EXPLORE_EVERY - 2


def test_a_batch_pauses_planning_when_no_tree_would_save_its_cost():
    """Where neither this step's trees nor hoped-for ones save more than planning takes, a
    batch decodes plainly for PAUSE_STEPS steps without planning, drafting or looking up
    chains; then it plans again. A lone sequence, or a batch whose trees pay, never pauses."""
    linear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.01, 16: 0.16, 64: 0.64, 256: 2.56}),
                               max_nodes=64)
    batch = seqs(8)
    assert linear.choose(batch, 0, 1024).sizes == [1] * 8 and linear.paused == PAUSE_STEPS
    for _ in range(PAUSE_STEPS):
        plan = linear.choose(batch, 0, 1024)
        assert plan.sizes == [1] * 8 and plan.drafts == [0] * 8 and plan.lookups == [[]] * 8
        assert not any(seq.spec.pending_lookups for seq in batch)
        assert not linear.draft_after_prefill(seqs(1)[0])
    assert linear.paused == 0
    steps = linear.steps
    linear.choose(batch, 0, 1024)
    assert linear.steps == steps + 1 and linear.paused == PAUSE_STEPS   # planned again, paused again
    alone = seqs(1)
    linear.paused = 0
    linear.choose(alone, 0, 1024)
    assert linear.paused == 0
    flat = policy({1: 0.05, 16: 0.055, 64: 0.07, 256: 0.2, 1024: 0.8})
    assert all(n > 1 for n in flat.choose(seqs(8), 0, 1024).sizes) and flat.paused == 0


def test_drafting_cost_can_tip_the_balance():
    costs = {1: 0.05, 2: 0.051, 16: 0.07, 64: 0.2, 256: 0.8}
    assert policy(costs).choose(seqs(4), 0, 1024).sizes[0] > 1
    dear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(costs, draft_per_seq=0.05), max_nodes=64)
    assert dear.choose(seqs(4), 0, 1024).sizes == [1] * 4


def test_plain_decoding_never_drafts():
    p = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 64: 0.05}), max_nodes=64, fixed_size=1)
    batch = seqs(3)
    batch[0].spec.steps = 0
    assert p.choose(batch, 0, 1024).drafts == [0] * 3 and not p.draft_after_prefill(batch[0])


def test_plain_steps_bring_a_quiet_sequence_back_to_speculation():
    """A sequence the policy stopped drafting for is still scored: once the tokens after a
    plain step are known, its draft is checked against them, and when the drafts start to
    match the sequence speculates again; when they stop matching, it stops."""
    p = policy({1: 0.05, 2: 0.06, 16: 0.07, 64: 0.2, 256: 0.8})  # a tree costs ~1.2x a plain step
    (seq,) = seqs(1, skill=0.02)
    assert p.choose([seq], 0, 1024).sizes == [1]
    draft = prior_draft(10 * len(path) + path[-1] for path in PATHS)  # the rank-r guess at depth d: 10 d + r
    right = [10 * d for d in range(1, 5)]                             # every head's best guess
    seq.draft = draft
    for _ in range(10):
        p.pend_shadow(seq)
        seq.token_ids += right
        p.score_plain_steps(seq)
    assert not seq.spec.plain_drafts and p.choose([seq], 0, 1024).sizes[0] > 1
    for _ in range(30):
        p.pend_shadow(seq)
        seq.token_ids += [99, 98, 97, 96]
        p.score_plain_steps(seq)
    assert p.choose([seq], 0, 1024).sizes == [1]


def test_a_plain_step_waits_for_the_tokens_after_it():
    p = policy({1: 0.05, 16: 0.06, 64: 0.1, 256: 0.4})
    (seq,) = seqs(1)
    seq.draft = prior_draft(7 if path == (0,) else 0 for path in PATHS)
    p.pend_shadow(seq)
    seq.token_ids.append(7)
    p.score_plain_steps(seq)
    assert len(seq.spec.plain_drafts) == 1 and seq.spec.skill == 1.0   # 3 tokens still unknown
    seq.token_ids += [8, 5, 5]
    p.score_plain_steps(seq)
    assert not seq.spec.plain_drafts and seq.spec.skill != 1.0


def test_kept_by_tree_follows_the_matching_path():
    from server.tree import children_by_token, kept_below, kept_by_tree
    paths = ((0,), (1,), (0, 0), (1, 1), (1, 1, 0), (0, 0, 0))
    draft = [1, 2, 3, 4, 5]                                # the token of each path; (0, 0, 0) not drafted
    assert kept_by_tree(paths, draft, [2, 4, 5]) == 3
    assert kept_by_tree(paths, draft, [1, 3, 5]) == 2     # (0, 0, 0) is not in the tree
    assert kept_by_tree(paths, draft, [1, 4, 5]) == 1     # (0, 1) is not in the tree
    assert kept_by_tree(paths, draft, [9, 3, 5]) == 0
    # typical acceptance's verdicts: an acceptable child counts though the text took another
    said = {(0, 2): True, (0, 1): False, (1, 3): True}
    verdict = lambda depth, token: said.get((depth, token))     # noqa: E731
    children = children_by_token(paths, draft)
    assert kept_below(children, [9, 3, 5], verdict) == 1   # (1,) was acceptable; then unknown
    assert kept_below(children, [1, 3, 5], verdict) == 1   # drawn, but (0,) was not acceptable
    assert kept_below(children, [2, 4, 5], verdict) == 3   # no verdicts below: the text decides


def test_sampled_text_scores_a_shadow_tree_by_what_typical_acceptance_would_keep():
    """At temperature > 0 a plain step tests its shadow tree's first tokens at its root: an
    acceptable one counts as kept although the draw went elsewhere."""
    p = policy({1: 0.05, 2: 0.5, 16: 0.6, 64: 2.0, 256: 8.0})   # trees never pay: plain steps
    (seq,) = seqs(1, temperature=0.7)
    seq.draft = prior_draft(10 * len(path) + path[-1] for path in PATHS)
    plan = p.choose([seq], 0, 1024)
    assert plan.sizes == [1] and {10, 11} <= set(plan.trees[0].probes)   # the heads' first guesses
    probes = plan.trees[0].probes
    p.record_verdicts(seq, probes, [token == 11 for token in probes])   # as the engine does
    seq.token_ids += [99, 98, 97, 96]
    p.score(seq)
    assert not seq.spec.plain_drafts and not seq.spec.probe_verdicts
    unprobed = seqs(1, temperature=0.7)[0]
    unprobed.draft = seq.draft
    p.choose([unprobed], 0, 1024)
    unprobed.token_ids += [99, 98, 97, 96]
    p.score(unprobed)
    assert seq.spec.skill > unprobed.spec.skill              # no verdict: the text scored it 0


@pytest.mark.parametrize("fixed", [None, 1, 8, 32, 64])
def test_any_fixed_tree_size_builds_a_policy(fixed):
    p = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 64: 0.1}), max_nodes=64, fixed_size=fixed)
    assert p.shadow_size == 16
    assert p.choose(seqs(2), 0, 1024).sizes == [fixed or p.choose(seqs(2), 0, 1024).sizes[0]] * 2


def test_hopeful_drafting_only_while_drafts_are_cheap(monkeypatch):
    """A sequence planned plain (low skill) still drafts when a tree would pay at the usual
    skill, so its skill can recover; in a batch where those drafts would cost more than
    HOPE_SHARE of what such trees would save, it does not."""
    costs = {1: 0.05, 2: 0.051, 16: 0.06, 64: 0.2, 256: 0.8}
    cheap = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(costs, draft_fixed=0.001, draft_per_seq=0.0005),
                              max_nodes=64)
    (cold,) = seqs(1, skill=0.02)
    cold.spec.steps = 3
    plan = cheap.choose([cold], 0, 1024)
    assert plan.sizes == [1] and plan.drafts[0] > 1
    dear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(costs, draft_fixed=0.001, draft_per_seq=0.0015),
                             max_nodes=64)
    batch = seqs(8, skill=0.02)
    for s in batch:
        s.spec.steps = 3
    # 13 ms of drafts in a 55 ms step, for trees that would save ~15 ms if the hope came true
    assert dear.choose(batch, 0, 1024).drafts == [0] * 8
    monkeypatch.setattr("server.speculation_policy.HOPE_SHARE", 1.0)
    assert all(n > 1 for n in dear.choose(batch, 0, 1024).drafts)    # trees would pay at skill 1


def test_hopeful_drafts_that_lead_to_no_tree_are_worth_less():
    """hope_yield: the share of hopeful drafts whose sequence verified a tree the step after."""
    costs = {1: 0.05, 2: 0.051, 16: 0.06, 64: 0.2, 256: 0.8}
    p = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(costs, draft_fixed=0.001, draft_per_seq=0.0005),
                          max_nodes=64)
    (seq,) = seqs(1, skill=0.02)
    seq.spec.steps = 3
    for _ in range(40):   # too cold for a tree, hopeful every time
        plan = p.choose([seq], 0, 1024)
        assert plan.sizes == [1] and plan.drafts[0] > 1 and seq.spec.hoping
    assert p.hope_yield == HOPE_FLOOR
    seq.spec.skill = 1.0
    assert p.choose([seq], 0, 1024).sizes[0] > 1 and not seq.spec.hoping
    assert p.hope_yield > HOPE_FLOOR


def test_an_unsure_draft_costs_one_plain_step_not_two():
    """A lone sequence whose draft is unsure decodes plainly, but still drafts for the next
    step: its next draft is a new one, likely as good as the heads usually are."""
    p = policy({1: 0.05, 2: 0.051, 4: 0.052, 8: 0.055, 16: 0.06, 64: 0.2, 256: 0.8})
    (seq,) = seqs(1)
    seq.draft = Draft([0] * len(PATHS), [1e-4] * len(PATHS))
    plan = p.choose([seq], 0, 1024)
    assert plan.sizes == [1] and plan.drafts[0] > 1


def test_the_tree_is_the_drafts_likeliest_nodes_and_grows_with_its_confidence():
    """Two sequences with the same heads: one whose draft is sure of a deep path, one whose
    draft is unsure of everything. Each tree holds its own draft's likeliest nodes, and the
    sure draft gets the bigger tree (at a price per node, it has more nodes worth it)."""
    p = policy({1: 0.05, 4: 0.051, 8: 0.06, 16: 0.08, 64: 0.25, 256: 1.0})
    sure, unsure = seqs(2)
    sure_chances = [0.95 ** len(path) if all(r == 0 for r in path) else 0.01 for path in PATHS]
    sure.draft = Draft([100 + j for j in range(len(PATHS))], sure_chances)
    unsure.draft = Draft([200 + j for j in range(len(PATHS))], [0.3 ** len(path) / (1 + path[-1]) for path in PATHS])
    plan = p.choose([sure, unsure], 0, 1024)
    deep = tuple(path for path in PATHS if all(r == 0 for r in path))
    assert set(deep) <= set(plan.trees[0].head_paths)
    assert plan.sizes[0] > plan.sizes[1]
    for seq, tree in zip((sure, unsure), plan.trees):
        chosen = [PATHS.index(path) for path in tree.head_paths]
        left_out = [seq.draft.chances[j] for j in range(len(PATHS)) if j not in chosen]
        assert min(seq.draft.chances[j] for j in chosen) >= max(left_out)
        assert tree.expected == pytest.approx(sum(seq.draft.chances[j] for j in chosen))
        by_path = dict(zip(tree.tree.paths, tree.tokens))
        assert all(by_path[PATHS[j]] == seq.draft.tokens[j] for j in chosen)
