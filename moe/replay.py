"""Routing replay and routing consistency: the train/inference routing mismatch of RL on MoE.

Shape legend (moe/__init__.py): T tokens (B*S), B batch, S positions, K routing slots, E experts.

In RL on MoE models the rollout (inference) pass and the training forward can pick different
experts for the same token (another dtype, another batch composition, KV-cached decoding, other
kernels), so the policy that is trained is not the one that sampled. Routing replay (Rollout
Routing Replay, R3: Ma et al. 2025, arXiv 2510.11370, Sec. 3; the routing replay Ring-1T and
GSPO use) records each MoE layer's expert ids during the rollout and forces them in the training
forward: the same experts per token, with the gate weights recomputed from the *current* router
scores at the recorded ids (R3's replayed gate: the training softmax restricted to the rollout's
mask), so the router still gets gradients.

One mechanism, a forward hook on the router module that reads (record) or replaces (replay) the
decision it returns:

- moekit routers (every ``routers.routing.RouterBase``: TopK, threshold, recurrent, expert
  choice, MoR's depth routers) return ``routers.Routing``; replay swaps ids_TK and recomputes
  weights_TK with the router's own rule, ``router.combine_weights(probs_TE, ids_TK)``. The
  Megatron adapter (``moe.integrations.megatron.MoekitRouter``) wraps such a router, so its
  replay is the same hook (Megatron's own TopKRouter has ``moe_enable_routing_replay``).
- Hugging Face routers (transformers >= 5: the ``gate``/``router`` next to an ``experts``
  module, returning (logits_TE, weights_TK, ids_TK)): the ids are swapped and the weights
  recomputed from the returned logits with ``routers.routing.topk_weights``, the rule read from
  the gate (sigmoid scores when it has ``e_score_correction_bias``, ``norm_topk_prob`` (default
  True: Mixtral, GPT-OSS), ``routed_scaling_factor``).

``weights="recompute"`` (default) is R3; ``weights="recorded"`` replays the recorded weights too
(the rollout's exact gate; the router then gets no gradient from the task loss, only from its
auxiliary losses). Auxiliary losses stay the router's own, computed on its fresh top-k (their
gradient flows through the scores either way); capacity is not applied again (recorded ids are
already after capacity). A router called several times per forward (MoR, decoding steps)
replays its calls in order; the calls cycle, so a router called once per forward replays the
same ids on every forward (several epochs on one rollout, activation recomputation).

:func:`routing_consistency` runs a model under two settings and reports, per router, the
fraction of tokens whose set of experts differs (0 for identical settings).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from routers.routing import RouterBase, Routing, expert_counts, topk_weights

__all__ = ["RoutedCall", "RoutingRecord", "record", "replay", "find_routers", "routing_consistency",
           "topk_set_changes", "SETTINGS", "WEIGHT_MODES"]

WEIGHT_MODES = ("recompute", "recorded")


@dataclass(frozen=True)
class RoutedCall:
    """One router call: ids_TK int64 (T, K), -1 empty; weights_TK (T, K) detached, or None;
    lead_shape, the router input's leading dims ((B, S) for a (B, S, D) input, else (T,))."""

    ids_TK: Tensor
    weights_TK: Optional[Tensor]
    lead_shape: tuple


class RoutingRecord:
    """The routing decisions of one recorded pass: router name (its name in
    ``model.named_modules()``) -> the list of its calls (:class:`RoutedCall`), in call order."""

    def __init__(self, calls: Optional[dict] = None) -> None:
        self.calls: dict = {} if calls is None else calls

    def __getitem__(self, name: str) -> list:
        return self.calls[name]

    def __contains__(self, name: str) -> bool:
        return name in self.calls

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def layers(self) -> list:
        """The recorded routers' names, in first-call order."""
        return list(self.calls)

    def ids(self, name: str) -> Tensor:
        """int64 (T, K): all calls of router ``name`` as one token list, in the order of a single
        full forward. Calls on (B, S, D) inputs with the same B (decoding steps, or B = 1 rows run
        one by one) are joined along S, then flattened b-major; other calls are concatenated.
        Calls with fewer slots are padded with -1."""
        return self._joined(name)[0]

    def _joined(self, name: str) -> tuple:
        """(ids_TK, weights_TK or None, lead_shape) of router ``name``'s calls joined (see ids)."""
        calls = self.calls[name]
        K = max(c.ids_TK.shape[1] for c in calls)
        by_seq = len({c.lead_shape[0] for c in calls}) == 1 and all(len(c.lead_shape) == 2 for c in calls)

        def join(ts, fill):
            ts = [torch.nn.functional.pad(t, (0, K - t.shape[1]), value=fill) for t in ts]
            if by_seq:
                return torch.cat([t.view(*c.lead_shape, K) for t, c in zip(ts, calls)], dim=1).reshape(-1, K)
            return torch.cat(ts, dim=0)

        ids = join([c.ids_TK for c in calls], -1)
        weights = None if any(c.weights_TK is None for c in calls) else join([c.weights_TK for c in calls], 0.0)
        lead = (calls[0].lead_shape[0], ids.shape[0] // calls[0].lead_shape[0]) if by_seq else (ids.shape[0],)
        return ids, weights, lead

    def merged(self) -> "RoutingRecord":
        """One call per router, its calls joined as :meth:`ids` joins them: the record of
        token-by-token decoding (``CausalLM.generate`` or a ``cache=`` loop) replayed in one full
        forward over the same tokens. transformers' gates see (T, D), so their decoding steps are
        joined in call order (step-major): merge those for B = 1 only."""
        return RoutingRecord({name: [RoutedCall(*self._joined(name))] for name in self.calls})

    def select(self, rows) -> "RoutingRecord":
        """The record of a mini-batch: ``rows`` (an index, slice or index tensor) of the batch
        dim B of every call made on a (B, S, D) input (HF routers see (T, D): use ``ids``)."""
        out = {}
        for name, calls in self.calls.items():
            sel = []
            for c in calls:
                if len(c.lead_shape) != 2:
                    raise ValueError(f"RoutingRecord.select: router {name!r} was called on (T, D) input "
                                     f"{c.lead_shape}; rows can only be selected from (B, S, D) calls")
                B, S = c.lead_shape

                def pick(t):
                    return None if t is None else t.view(B, S, -1)[rows].reshape(-1, t.shape[-1])

                ids = pick(c.ids_TK)
                sel.append(RoutedCall(ids, pick(c.weights_TK), (ids.shape[0] // S, S)))
            out[name] = sel
        return RoutingRecord(out)

    def to(self, device) -> "RoutingRecord":
        return RoutingRecord({n: [RoutedCall(c.ids_TK.to(device), None if c.weights_TK is None else
                                             c.weights_TK.to(device), c.lead_shape) for c in calls]
                              for n, calls in self.calls.items()})

    def __repr__(self) -> str:
        return f"RoutingRecord({', '.join(f'{n}: {len(c)} call(s)' for n, c in self.calls.items())})"


# ---- the two router output formats ------------------------------------------------------------

def _hf_gate(module: nn.Module) -> Optional[nn.Module]:
    """The transformers router of an MoE block (``gate`` or ``router`` next to ``experts``)."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module) or not type(experts).__module__.startswith("transformers."):
        return None
    for attr in ("gate", "router"):
        gate = getattr(module, attr, None)
        if (isinstance(gate, nn.Module) and type(gate).__module__.startswith("transformers.")
                and hasattr(gate, "top_k")):
            return gate
    return None


def find_routers(model: nn.Module) -> dict:
    """name -> router module of every router in ``model`` that replay and record hook: moekit
    routers (``routers.routing.RouterBase``) and transformers' MoE gates (see the module
    docstring). Raises ValueError naming the model when it has none."""
    found = {}
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in model.named_modules():
        if isinstance(m, RouterBase):
            found[name] = m
        gate = _hf_gate(m)
        if gate is not None:
            found[names[id(gate)]] = gate
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no router that moe.replay knows: moekit routers "
                         "(routers.routing.RouterBase) or transformers MoE gates next to an experts module")
    return found


def _read(output) -> tuple:
    """(ids_TK, weights_TK) of a router's output."""
    if isinstance(output, Routing):
        return output.ids_TK, output.weights_TK
    return output[2], output[1]


def _hf_weights(gate: nn.Module, logits_TE: Tensor, ids_TK: Tensor, like: Tensor) -> Tensor:
    """The HF gate's weight rule at ids_TK, from its logits (float32 inside, ``like``'s dtype out)."""
    logits = logits_TE.float()
    sigmoid = getattr(gate, "e_score_correction_bias", None) is not None
    probs_TE = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    w = topk_weights(probs_TE, ids_TK, normalize=bool(getattr(gate, "norm_topk_prob", True)),
                     scale=float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0), eps=1e-20 if sigmoid else 0.0)
    return w.to(like.dtype)


def _replaced(module: nn.Module, output, ids_TK: Tensor, weights_TK: Optional[Tensor]):
    """The router's output with ids_TK, and weights_TK or (None) the router's weights recomputed."""
    if isinstance(output, Routing):
        if weights_TK is None:
            weights_TK = module.combine_weights(output.probs_TE, ids_TK)
        # experts_per_token over the tokens with a slot (padded tokens have none); nothing is dropped
        kept_T = (ids_TK >= 0).any(dim=1).sum().to(torch.float32).clamp(min=1.0)
        counts_E = expert_counts(ids_TK, output.num_experts)
        return dataclasses.replace(
            output, ids_TK=ids_TK, weights_TK=weights_TK.to(output.weights_TK.dtype), counts_E=counts_E,
            dropped_fraction=torch.zeros_like(output.dropped_fraction),
            experts_per_token=counts_E.sum().to(torch.float32) / kept_T)
    logits_TE, old_w, old_ids = output[0], output[1], output[2]
    w = _hf_weights(module, logits_TE, ids_TK, old_w) if weights_TK is None else weights_TK.to(old_w.dtype)
    return (logits_TE, w, ids_TK.to(old_ids.dtype)) + tuple(output[3:])


# ---- record / replay -----------------------------------------------------------------------------

def _lead_shape(args, kwargs) -> tuple:
    x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    return tuple(x.shape[:-1]) if isinstance(x, Tensor) and x.dim() == 3 else (None,)


@contextlib.contextmanager
def _hooked(model: nn.Module, hook_for: Callable):
    handles = [m.register_forward_hook(hook_for(name), with_kwargs=True)
               for name, m in find_routers(model).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model: nn.Module, *, weights: bool = True):
    """``with moe.replay.record(model) as rec: model(batch)`` fills ``rec``, a
    :class:`RoutingRecord`, with every router call's ids (and weights, detached, unless
    ``weights=False``). Works in any mode, with or without grad. Inside :func:`replay`, a
    ``record`` entered after it sees the replayed routing (hooks run in registration order)."""
    rec = RoutingRecord()

    def hook_for(name):
        def hook(module, args, kwargs, output):
            ids_TK, w_TK = _read(output)
            lead = _lead_shape(args, kwargs)
            lead = lead if lead != (None,) else (ids_TK.shape[0],)
            rec.calls.setdefault(name, []).append(
                RoutedCall(ids_TK.detach().to(torch.int64), w_TK.detach() if weights else None, lead))
        return hook

    with _hooked(model, hook_for):
        yield rec


@contextlib.contextmanager
def replay(model: nn.Module, rec: RoutingRecord, *, weights: str = "recompute"):
    """Inside ``with moe.replay.replay(model, rec):`` every router of ``model`` routes each token to
    the experts ``rec`` recorded for it (the router still runs: its scores, state and auxiliary
    losses are the current ones). weights="recompute" (R3): the weights are the router's rule
    applied to its current scores at the recorded ids, differentiable, so the router is trained;
    "recorded": the recorded weights (``record(..., weights=True)``), a constant. Raises
    ValueError naming the router when the record lacks it or its token count differs."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if not isinstance(rec, RoutingRecord):
        raise TypeError(f"rec must be a moe.replay.RoutingRecord, got {type(rec).__name__}")
    cursor: dict = {}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            calls = rec.calls.get(name)
            if not calls:
                raise ValueError(f"replay: the record has no call of router {name!r} (recorded: {rec.layers})")
            i = cursor.get(name, 0)
            cursor[name] = i + 1
            call = calls[i % len(calls)]
            ids_now, _ = _read(output)
            if call.ids_TK.shape[0] != ids_now.shape[0]:
                raise ValueError(f"replay: router {name!r} call {i} routes {ids_now.shape[0]} tokens but the "
                                 f"record has {call.ids_TK.shape[0]} (same batch, or RoutingRecord.select rows)")
            w = None
            if weights == "recorded":
                if call.weights_TK is None:
                    raise ValueError("replay(weights='recorded') needs a record made with weights=True")
                w = call.weights_TK.to(ids_now.device)
            return _replaced(module, output, call.ids_TK.to(ids_now.device), w)
        return hook

    with _hooked(model, hook_for):
        yield


# ---- routing consistency -------------------------------------------------------------------------

def _call(model: nn.Module, batch, forward: Optional[Callable]):
    if forward is not None:
        return forward(model, batch)
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _cast_batch(batch, dtype):
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_batch(v, dtype) for k, v in batch.items()}
    return batch


def _rows(batch, i: int):
    if isinstance(batch, Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: _rows(v, i) if isinstance(v, Tensor) else v for k, v in batch.items()}
    raise TypeError(f"batch must be a tensor or a dict of tensors, got {type(batch).__name__}")


def _batch_size(batch) -> int:
    t = batch if isinstance(batch, Tensor) else next(v for v in batch.values() if isinstance(v, Tensor))
    return t.shape[0]


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    was = model.training
    model.train(training)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _recorded(model, fn) -> RoutingRecord:
    with record(model, weights=False) as rec:
        fn()
    return rec


def _in_dtype(dtype):
    def setting(model, batch, forward):
        m = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
        with _mode(m, False):
            return _recorded(m, lambda: _call(m, _cast_batch(batch, dtype), forward))
    return setting


def _in_mode(training: bool):
    def setting(model, batch, forward):
        with _mode(model, training):
            return _recorded(model, lambda: _call(model, batch, forward))
    return setting


def _alone(model, batch, forward):
    with _mode(model, False):
        return _recorded(model, lambda: [_call(model, _rows(batch, i), forward) for i in range(_batch_size(batch))])


def _kv_cached(model, batch, forward):
    """Token by token with the model's KV cache: ``model.new_cache()`` and ``model(ids, cache=)``
    (moe.CausalLM); batch is input_ids (B, S)."""
    if not hasattr(model, "new_cache") or not isinstance(batch, Tensor):
        raise ValueError("the 'kv_cached' setting needs a model with new_cache() and forward(ids, cache=) "
                         "(moe.CausalLM) and batch = input_ids (B, S)")
    with _mode(model, False):
        cache = model.new_cache()
        return _recorded(model, lambda: [model(batch[:, s:s + 1], cache=cache) for s in range(batch.shape[1])])


# name -> setting(model, batch, forward) -> RoutingRecord. Every setting but "train" runs in eval
# mode, without grad; dtype settings run on a copy of the model when its dtype differs.
SETTINGS = {
    "float32": _in_dtype(torch.float32), "bfloat16": _in_dtype(torch.bfloat16),
    "float64": _in_dtype(torch.float64), "eval": _in_mode(False), "train": _in_mode(True),
    "batched": _in_mode(False), "alone": _alone, "full": _in_mode(False), "kv_cached": _kv_cached,
}


def topk_set_changes(ids_a_TK: Tensor, ids_b_TK: Tensor) -> Tensor:
    """bool (T,): whether token t's set of experts (non-empty slots, order ignored) differs
    between two routings of the same tokens (their slot counts may differ)."""
    if ids_a_TK.shape[0] != ids_b_TK.shape[0]:
        raise ValueError(f"the two routings have {ids_a_TK.shape[0]} and {ids_b_TK.shape[0]} tokens")
    K = max(ids_a_TK.shape[1], ids_b_TK.shape[1])
    a, b = (torch.nn.functional.pad(i.to(torch.int64), (0, K - i.shape[1]), value=-1).sort(dim=1).values
            for i in (ids_a_TK, ids_b_TK.to(ids_a_TK.device)))
    return (a != b).any(dim=1)


def _setting(s) -> Callable:
    if callable(s):
        return s
    if s not in SETTINGS:
        raise ValueError(f"a setting must be one of {sorted(SETTINGS)} or a callable "
                         f"(model, batch, forward) -> RoutingRecord, got {s!r}")
    return SETTINGS[s]


def routing_consistency(model: nn.Module, batch, setting_a: Union[str, Callable] = "float32",
                        setting_b: Union[str, Callable] = "bfloat16", *,
                        forward: Optional[Callable] = None) -> dict:
    """Per router, the fraction of tokens whose top-k set (the set of experts it routes them to)
    changes between two settings of the same model on the same batch.

    Settings (``SETTINGS``): "float32" / "bfloat16" / "float64" (the model, or a copy of it, in
    that dtype), "eval" / "train" (mode: jitter, dropout), "batched" / "alone" (the whole batch in
    one forward, or each row of it alone), "full" / "kv_cached" (one forward, or token-by-token
    decoding with the KV cache of a moe.CausalLM on input_ids (B, S)); or any callable
    ``setting(model, batch, forward) -> RoutingRecord``. batch: a tensor (``model(batch)``) or a
    dict (``model(**batch)``), or what ``forward(model, batch)`` takes. Tokens are aligned through
    :meth:`RoutingRecord.ids`. Returns {router name: fraction in [0, 1]} (host floats).
    """
    rec_a = _setting(setting_a)(model, batch, forward)
    rec_b = _setting(setting_b)(model, batch, forward)
    missing = set(rec_a.layers) ^ set(rec_b.layers)
    if missing:
        raise ValueError(f"routers {sorted(missing)} ran under one setting only")
    out = {}
    for name in rec_a.layers:
        changed = topk_set_changes(rec_a.ids(name), rec_b.ids(name))
        out[name] = float(changed.float().mean()) if changed.numel() else 0.0
    return out
