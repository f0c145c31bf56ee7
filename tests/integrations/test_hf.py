"""The "moekit" experts implementation for Hugging Face transformers: tiny random Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and GPT-OSS give the logits and parameter gradients of
transformers' "eager" experts (float32 and float64 tolerances)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from moe.integrations import hf  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def _qwen2_moe():
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=40, num_experts=6,
                                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
                                       num_experts=6, num_experts_per_tok=3, norm_topk_prob=True)


def _deepseek_v3():
    cfg = dict(COMMON, num_key_value_heads=4)
    return transformers.DeepseekV3Config(**cfg, intermediate_size=64, moe_intermediate_size=16,
                                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                         n_group=2, topk_group=1, first_k_dense_replace=1,
                                         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                         qk_nope_head_dim=8, v_head_dim=8)


def _gpt_oss():
    cfg = dict(COMMON, num_attention_heads=4, num_key_value_heads=2)
    return transformers.GptOssConfig(**cfg, head_dim=8, intermediate_size=24, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"])


CONFIGS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
           "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random, non-trivial weights everywhere (biases and GPT-OSS router included), scaled so
    activations stay O(1) and the clamped GPT-OSS SwiGLU sees both sides of its limit."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1))


def _run(model, ids, impl):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5), (torch.float64, 1e-10, 1e-12)])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_logits_and_grads_match_eager(arch, dtype, rtol, atol):
    hf.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](), experts_implementation="eager")
    model = model.to(dtype)
    _randomize(model, seed=1)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = _run(model, ids, "eager")
    logits, grads = _run(model, ids, "moekit")
    assert model.config._experts_implementation == "moekit"
    torch.testing.assert_close(logits, ref_logits, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads, "no expert parameter received a gradient"
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=rtol * 10, atol=atol * 10, msg=n)


def test_moekit_path_is_taken(monkeypatch):
    """The comparison above is not vacuous: "moekit" really calls our forward."""
    hf.register()
    calls = []
    real = hf.moekit_experts_forward

    def spy(self, *args):
        calls.append(type(self).__name__)
        return real(self, *args)

    from transformers.integrations.moe import ExpertsInterface
    monkeypatch.setitem(ExpertsInterface._global_mapping, hf.NAME, spy)
    model = transformers.AutoModelForCausalLM.from_config(_mixtral(), experts_implementation="moekit")
    model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert calls == ["MixtralExperts"] * 2


def test_register_is_idempotent():
    hf.register()
    hf.register()
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS[hf.NAME] is hf.moekit_experts_forward
    assert list(ALL_EXPERTS_FUNCTIONS.keys()).count(hf.NAME) == 1


def test_expert_parallel_sentinels_are_dropped():
    """Ids >= num_experts (transformers' EP sentinels) contribute nothing, as in its grouped_mm."""
    hf.register()
    model = transformers.AutoModelForCausalLM.from_config(_mixtral(), experts_implementation="moekit")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 32)
    ids = torch.tensor([[0, 1], [2, 4], [4, 4], [3, 0], [1, 2]])
    w = torch.rand(5, 2)
    experts._is_expert_parallel = True
    out = hf.moekit_experts_forward(experts, x, ids, w)
    experts._is_expert_parallel = False
    ref = hf.moekit_experts_forward(experts, x, ids.clamp(max=3), w.masked_fill(ids >= 4, 0.0))
    torch.testing.assert_close(out, ref)
    assert out[2].abs().max() == 0


def test_importing_moe_does_not_import_transformers():
    code = "import sys, moe, moe.integrations, moe.integrations.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
