"""ExpertChoiceRouter (Zhou et al. 2022): every expert takes exactly its top-C tokens."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routers import ExpertChoiceRouter, capacity


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 20), E=st.integers(1, 6), cf=st.floats(0.25, 4.0), seed=st.integers(0, 2**16))
def test_each_expert_takes_its_top_c_tokens(T, E, cf, seed):
    torch.manual_seed(seed)
    r = ExpertChoiceRouter(5, E, cf)
    r.weight.data.normal_(0, 2.0)
    out = r(torch.randn(T, 5))
    C = min(T, capacity(T, 1, E, cf))
    assert (out.counts_E == C).all()
    probs = out.probs_TE.detach().numpy()
    for e in range(E):
        takers = set(np.nonzero((out.ids_TK == e).any(-1).numpy())[0].tolist())
        assert len(takers) == C
        if C and C < T:  # the taken tokens score at least as high as any other token
            assert probs[sorted(takers), e].min() >= np.delete(probs[:, e], sorted(takers)).max()
    for t in range(T):  # chosen experts first, ascending, weights = their probabilities
        row = out.ids_TK[t]
        real = row[row >= 0]
        assert (row[: len(real)] >= 0).all() and torch.equal(real, real.sort().values)
        torch.testing.assert_close(out.weights_TK[t, : len(real)], out.probs_TE[t, real])
    unrouted = (out.ids_TK < 0).all(-1).float().mean().item() if T else 0.0
    assert out.dropped_fraction.item() == pytest.approx(unrouted)
    assert out.experts_per_token.item() == pytest.approx(E * C / max(T, 1))


def router_with_probs(probs, capacity_factor):
    """A router whose softmax over one-hot inputs reproduces ``probs`` (T, E)."""
    probs = torch.tensor(probs)
    T, E = probs.shape
    r = ExpertChoiceRouter(T, E, capacity_factor)
    r.weight.data = torch.log(probs).T.contiguous()
    return r, torch.eye(T)


def test_a_token_may_get_every_expert():
    r, x = router_with_probs([[0.34, 0.33, 0.33], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], 2.0)  # C = 2
    out = r(x)
    assert out.ids_TK.tolist() == [[0, 1, 2], [0, -1, -1], [1, 2, -1]]
    torch.testing.assert_close(out.weights_TK[0], torch.tensor([0.34, 0.33, 0.33]))


def test_a_token_may_get_no_expert():
    r, x = router_with_probs([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], 2 / 3)  # C = 1
    out = r(x)
    assert out.ids_TK.tolist() == [[0, -1], [1, -1], [-1, -1]]
    assert out.dropped_fraction.item() == pytest.approx(1 / 3)
    assert (out.weights_TK[2] == 0).all()


def test_padded_tokens_are_never_picked():
    r = ExpertChoiceRouter(4, 3, 3.0)  # C = T: every expert wants every token
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = r(x, padding_mask=mask)
    assert (out.ids_TK[~mask.reshape(-1)] == -1).all()
    assert (out.ids_TK[mask.reshape(-1)] >= 0).all()
    assert out.dropped_fraction.item() == 0.0
