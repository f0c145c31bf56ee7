"""Hypothesis settings and strategies shared by the property tests.

Shape legend: T tokens, K slots per token, E experts.
"""

import torch
from hypothesis import HealthCheck, settings, strategies as st

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routings(draw, max_T=64):
    """(ids_TK int64, E): random ids with -1 holes, sometimes all on one expert or all empty."""
    T = draw(st.integers(0, max_T))
    K = draw(st.integers(1, 8))
    E = draw(st.sampled_from([1, 2, 3, 7, 8, 31, 64, 100, 256]))
    seed = draw(st.integers(0, 2**31 - 1))
    hole = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from(["uniform", "one", "few"]))
    if spread == "one":
        ids = torch.full((T, K), draw(st.integers(0, E - 1)), dtype=torch.long)
    else:
        hi = E if spread == "uniform" else min(E, 2)  # "few": most experts get zero rows
        ids = torch.randint(0, hi, (T, K), generator=g)
    ids[torch.rand(T, K, generator=g) < hole] = -1
    return ids, E
