"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", Sec. 3: the expert
of token x_t is hash(x_t), a fixed function of its token id; the HASH baseline of Clark et al.
2022, "Unified Scaling Laws for Routed Language Models").

Shape legend: T tokens, D hidden size, E experts, K slots, V vocabulary.

The hash is a random, fixed, balanced table expert_VK built once from a seed (Roller et al.'s
"random hash" of the vocabulary, made balanced): token ids are shuffled into random
ranks r; rank r sits in block r // E at column r % E, and slot j of the token is
tau_b[(r % E + j) mod E], tau_b a random permutation of the experts for block b. Each slot of
each full block of E ranks is a permutation of the experts, so over a uniform vocabulary every
expert gets floor(V/E) or ceil(V/E) token ids per slot, and a token's k experts are distinct.
With ``token_counts`` (how often each id occurs in the training data) the table is instead
Roller et al.'s "balanced assignment": ids in decreasing frequency go greedily to the K least
loaded experts, so the expected token loads differ by at most the largest count (over
uniformly random ids the plain table balances ids, not tokens, and a Zipfian vocabulary puts
its few frequent ids wherever the hash sends them).
Hash routing has no parameters and no losses: the choice never depends on x, on the context or
on the batch, only on the id. Gates are 1/K per slot (Roller et al. use one expert with weight
1; for K > 1 their MultiHash splits each expert into K segments instead, here the K experts
are averaged). probs_TE is that fixed distribution (1/K on the token's experts) and logits_TE
its log (-inf off the token's experts).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routers.checks import check_int
from routers.routing import RouterBase, Routing, compute_dtype, count_chosen, make_routing


def balanced_hash_table(vocab_size: int, num_experts: int, top_k: int = 1, *, seed: int = 0) -> Tensor:
    """int64 (V, K): the K distinct experts of every token id, balanced per slot (see the module
    docstring); the same table for the same (V, E, K, seed) on every machine (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    V, E = vocab_size, num_experts
    rank_V = torch.randperm(V, generator=g)
    blocks = -(-V // E)
    tau_BE = torch.rand(blocks, E, generator=g).argsort(dim=1)
    cols_VK = (rank_V[:, None] % E + torch.arange(top_k)) % E
    return tau_BE[(rank_V // E)[:, None], cols_VK]


def frequency_balanced_hash_table(token_counts_V: Tensor, num_experts: int, top_k: int = 1, *,
                                  seed: int = 0) -> Tensor:
    """int64 (V, K): Roller et al.'s balanced assignment. Ids in decreasing count (ties in a random
    order from seed) each take the K distinct experts of least load so far (ties: fewer ids, then
    lower expert), the load growing by the id's count. Greedy list scheduling keeps the largest
    and smallest expert load (sum of the counts of its ids) within max(token_counts) of each other,
    and ids of count 0 go round-robin."""
    import heapq

    counts = token_counts_V.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(counts.numel(), generator=g)
    order = shuffled[counts[shuffled].argsort(descending=True, stable=True)].tolist()
    counts_list = counts.tolist()
    heap = [(0.0, 0, e) for e in range(num_experts)]  # (load, ids, expert): a min-heap
    table = [[0] * top_k for _ in range(len(counts_list))]
    for v in order:
        picked = [heapq.heappop(heap) for _ in range(top_k)]
        table[v] = [e for _, _, e in picked]
        for load, n, e in picked:
            heapq.heappush(heap, (load + counts_list[v], n + 1, e))
    return torch.tensor(table, dtype=torch.int64).reshape(len(counts_list), top_k)


class HashRouter(RouterBase):
    """A fixed expert (or K distinct ones) per token id: forward(x, input_ids=ids).

    vocab_size V: ids must lie in [0, V) (padded positions may hold anything). seed picks the
    table (``balanced_hash_table``; with token_counts (V,), the counts of each id in the training
    data, ``frequency_balanced_hash_table``), kept as the buffer ``expert_VK`` (saved in
    state_dict, so a checkpoint keeps its hash). hidden_size is only checked against x (MoELayer's contract).
    ``routes_on_input_ids`` tells MoELayer and the LM to pass the token ids.
    """

    routes_on_input_ids = True

    def __init__(self, hidden_size: int, num_experts: int, vocab_size: int, top_k: int = 1, *,
                 seed: int = 0, token_counts: Optional[Tensor] = None, check_finite: bool = True) -> None:
        super().__init__()
        self._init_common(hidden_size, num_experts, jitter=0.0, check_finite=check_finite)
        vocab_size = check_int("vocab_size", vocab_size)
        top_k = check_int("top_k", top_k, maximum=num_experts)
        seed = check_int("seed", seed, minimum=-(2**63))
        self.vocab_size, self.top_k, self.seed = vocab_size, top_k, seed
        if token_counts is None:
            table = balanced_hash_table(vocab_size, num_experts, top_k, seed=seed)
        else:
            if not isinstance(token_counts, Tensor) or tuple(token_counts.shape) != (vocab_size,) \
                    or token_counts.is_complex() or not bool((token_counts >= 0).all()):
                raise ValueError(f"token_counts must be a tensor of shape ({vocab_size},) of counts >= 0")
            table = frequency_balanced_hash_table(token_counts, num_experts, top_k, seed=seed)
        self.register_buffer("expert_VK", table)

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None,
                input_ids: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D), input_ids of x.shape[:-1] or (T,) -> Routing. ``state`` is ignored."""
        _, valid_T, _ = self._prepare(x, padding_mask, self.expert_VK.device, upcast=False)
        ids_T = self._token_ids(input_ids, x, valid_T)
        (T,), E, K = ids_T.shape, self.num_experts, self.top_k
        dtype = compute_dtype(x.dtype)
        ids_TK = self.expert_VK[ids_T]
        weights_TK = torch.full((T, K), 1.0 / K, dtype=dtype, device=x.device)
        probs_TE = torch.zeros(T, E, dtype=dtype, device=x.device).scatter(1, ids_TK, 1.0 / K)
        logits_TE = probs_TE.log()
        if valid_T is not None:
            ids_TK = ids_TK.masked_fill(~valid_T[:, None], -1)
        return make_routing(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                            valid_T=valid_T, chosen_slots=count_chosen(ids_TK, valid_T), aux_losses={})

    def _token_ids(self, input_ids, x: Tensor, valid_T: Optional[Tensor]) -> Tensor:
        """The one check of input_ids: an integer tensor of x.shape[:-1] or (T,) on x's device,
        every real token's id in [0, vocab_size); -> int64 (T,) (padded positions read id 0)."""
        if input_ids is None:
            raise ValueError("HashRouter routes on token ids: pass input_ids (x.shape[:-1]) to the router, "
                             "MoELayer.forward(x, input_ids=...) or the LM (moe.CausalLM passes them)")
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        T = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if tuple(input_ids.shape) not in (tuple(x.shape[:-1]), (T,)):
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, expected {tuple(x.shape[:-1])} or ({T},)")
        if input_ids.device != x.device:
            raise ValueError(f"input_ids is on {input_ids.device} but x is on {x.device}")
        ids_T = input_ids.reshape(-1).to(torch.int64)
        if valid_T is not None:
            ids_T = ids_T.masked_fill(~valid_T, 0)
        in_range = ((ids_T >= 0) & (ids_T < self.vocab_size)).all()
        message = f"input_ids must lie in [0, vocab_size={self.vocab_size}) for every real token"
        if not torch.compiler.is_compiling():
            if ids_T.device.type == "cpu":
                if not bool(in_range):
                    raise ValueError(message)
            else:  # no host sync on accelerators: a device-side assert fails the next sync point
                torch._assert_async(in_range, message)
        return ids_T

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"vocab_size={self.vocab_size}, seed={self.seed}")
