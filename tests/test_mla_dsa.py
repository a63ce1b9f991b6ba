"""DeepSeek V3.2 / GLM-5 sparse attention: the top-k selection of both twins and the oracle, and its tie rule
(equal scores: the lower key index, i.e. the earlier token, wins), which transformers' ``torch.topk`` does
not promise (its CPU order among ties changes with the row length)."""

import jax.numpy as jnp
import numpy as np
import torch

import jax_attn.mla as jmla
import torch_attn.mla as tmla
from compare import oracle_mla
from compare.kinds.mla import MLA_CASES, build_inputs


def _all_three(scores, keep, k):
    t = tmla.select_topk(torch.from_numpy(scores), torch.from_numpy(keep), k).numpy()
    j = np.asarray(jmla.select_topk(jnp.asarray(scores), jnp.asarray(keep), k))
    o = oracle_mla.topk_selection(scores, keep, k)[0]
    return t, j, o


def test_ties_go_to_the_lower_index_in_both_twins_and_the_oracle():
    scores = np.zeros((1, 3, 9), np.float32)
    scores[0, 0, 4] = 1.0  # one winner, then ties
    scores[0, 1, [2, 5, 7]] = 0.5  # a three-way tie for the first place
    keep = np.ones((1, 3, 9), bool)
    keep[0, 2, :3] = False  # masked keys never win a tie
    t, j, o = _all_three(scores, keep, 3)
    assert t.tolist() == j.tolist() == o.tolist() == [[[4, 0, 1], [2, 5, 7], [3, 4, 5]]]


def test_random_scores_with_ties_all_three_agree():
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((2, 5, 17)), 1).astype(np.float32)  # many exact ties
    keep = rng.random((2, 5, 17)) < 0.8
    for k in (1, 4, 17, 30):
        t, j, o = _all_three(scores, keep, k)
        assert t.tolist() == j.tolist() == o.tolist()


def test_the_tie_vector_selects_the_earliest_valid_keys():
    """``mla_dsa_ties``: indexer.wq_b = 0, so every key scores 0 and each query keeps its k earliest real
    keys (pads skipped); the layer equals dense attention restricted to those keys."""
    case = MLA_CASES["mla_dsa_ties"]
    a = build_inputs(case)
    c = case.config()
    m = tmla.MultiHeadLatentAttention(c)
    m.load_torch_state_dict({k: a[k] for k in a if k in dict(m.named_parameters())})
    t = torch.from_numpy
    _, idx = m(t(a["x"]), t(a["attention_mask"]), t(a["position_ids"]), return_topk=True)
    valid = a["attention_mask"].astype(bool)
    for b in range(case.B):
        for q in range(case.T):
            real = [s for s in range(q + 1) if valid[b, s]]
            got = sorted(s for s in idx[b, q].tolist() if s in real)
            assert got == real[: c.index_topk]


def test_tied_rows_flags_ties_and_near_ties_only():
    keep = np.ones((1, 3, 5), bool)
    scores = np.array([[[3, 2, 1, 1, 0], [3, 2, 1, 1 - 1e-7, 0], [3, 2, 1, 0.5, 0]]], np.float64)
    assert oracle_mla.tied_rows(scores, keep, 3).tolist() == [[True, True, False]]
    assert not oracle_mla.tied_rows(scores, keep, 5).any()  # k >= S: everything is selected
