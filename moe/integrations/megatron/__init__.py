"""Megatron-Core: moekit routers, grouped experts and the whole MoE layer inside Megatron models.

Shape legend (moe/__init__.py): S sequence length, B micro-batch size, D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.

Megatron's MoELayer calls ``router(hidden[S, B, H], padding_mask[S, B] (True = padding))`` ->
``(probs[T, E], routing_map[T, E])``, dispatches, and calls ``experts(x_ND sorted by local expert,
tokens_per_expert[L], permuted_probs[N])`` -> ``(y_ND, None)``. The adapters here fill those slots:

- :class:`MoekitRouter`: any moekit router (``routers/``). Its aux losses ride Megatron's
  ``MoEAuxLossAutoScaler`` on the probs and go to the aux-loss tracker; a router with an
  ``expert_bias`` buffer gets a ``local_tokens_per_expert`` buffer, which Megatron's
  ``finalize_model_grads`` all-reduces and uses to move the bias (DeepSeek-V3 Sec. 2.1.2).
- :class:`RecurrentRouters`: the RMoE router (Qiu et al. 2024, Eq. 3-4) across Megatron layers.
- :class:`MoekitExperts`: ``moe.GroupedExperts`` on the local experts (probs applied here).
- :class:`MoekitMoELayer`: ``moe.MoELayer`` as a TransformerLayer mlp.
- :func:`moekit_gpt_layer_spec`: Megatron's local GPT layer spec with those pieces swapped in::

      spec = moekit_gpt_layer_spec(router="topk", experts=True)
      model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=..., max_sequence_length=...)

Checkpoints use Megatron-Core's native keys both ways, so a model trained with Megatron's own
router and experts loads into the moekit spec and back (``load_state_dict`` and distributed
checkpoints): the router's entries as TopKRouter's (``mlp.router.weight``, ``mlp.router.expert_bias``),
the experts as SequentialMLP's (``mlp.experts.local_experts.{e}.linear_fc1.weight`` (H, D),
``linear_fc2.weight`` (D, F)) or, with ``config.moe_grouped_gemm``, GroupedMLP's (``mlp.experts.weight1``
(D, L*H) holding (L, D, H), ``weight2`` (L*F, D)), fc1 as ``[gate; up]`` in both libraries; the full
table and :func:`experts_to_megatron` / :func:`experts_from_megatron` are in
moe/integrations/megatron/checkpoint.py.

Importing this module imports megatron.core (``pip install moekit[megatron]``); importing
``moe`` does not. Tested with megatron-core 0.16.1; newer keyword arguments are accepted.
"""

try:  # the clear error when megatron-core is missing, before any submodule imports it
    from megatron.core import parallel_state  # noqa: F401
    from megatron.core.transformer.module import MegatronModule  # noqa: F401
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker  # noqa: F401
except ImportError as err:  # pragma: no cover
    raise ImportError("moe.integrations.megatron needs megatron-core: pip install moekit[megatron]") from err

# Submodules: checkpoint (Megatron's native state-dict layouts), router (MoekitRouter, config -> router,
# aux-loss plumbing), recurrent (RecurrentRouters),
# experts (MoekitExperts, MoekitMoELayer), spec (moekit_gpt_layer_spec).
from moe.integrations.megatron.checkpoint import experts_from_megatron, experts_to_megatron
from moe.integrations.megatron.router import MoekitRouter, topk_router_from_config
from moe.integrations.megatron.recurrent import RecurrentRouters
from moe.integrations.megatron.experts import MoekitExperts, MoekitMoELayer, activation_from_config
from moe.integrations.megatron.spec import RouterArg, moekit_gpt_layer_spec

__all__ = ["MoekitRouter", "RecurrentRouters", "MoekitExperts", "MoekitMoELayer", "moekit_gpt_layer_spec",
           "topk_router_from_config", "activation_from_config", "experts_to_megatron",
           "experts_from_megatron"]
