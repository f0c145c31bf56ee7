"""Decoder block and small causal LM: RMSNorm, rotary attention on SDPA with explicit positions.

Shape legend (moe/__init__.py): B batch, S query positions in this call, U key positions
(cached + new), G attention heads, A head dim, D model dim, F MLP hidden dim, V vocabulary.
`pos_BS` are absolute token positions (RoPE and the causal mask both use them, so a block can
run on any subset of a sequence, e.g. the tokens a Mixture-of-Recursions router selected);
`valid_BS` is False on padding (such keys are never attended, such tokens never routed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe.layer import MoELayer, collect_aux_losses


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019, Eq. 4); x (..., D)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x_BGSA: torch.Tensor, pos_BS: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE (Su et al. 2021, Eq. 34) in rotate-half form at the absolute positions pos_BS."""
    half = x_BGSA.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x_BGSA.device, dtype=torch.float64) / half)
    ang_BSA = (pos_BS.to(torch.float64)[..., None] * inv_freq).repeat(1, 1, 2)[:, None]
    cos, sin = ang_BSA.cos().to(x_BGSA.dtype), ang_BSA.sin().to(x_BGSA.dtype)
    x1, x2 = x_BGSA[..., :half], x_BGSA[..., half:]
    return x_BGSA * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of one attention site: k_BGUA, v_BGUA, pos_BU, valid_BU (grown by append).

    Entries keep their absolute positions, so a cache may hold any subset of a sequence
    (recursion-wise caching stores only the tokens selected at one recursion step).
    """

    def __init__(self):
        self.k = self.v = self.pos = self.valid = None

    def append(self, k, v, pos, valid):
        if self.k is None:
            self.k, self.v, self.pos, self.valid = k, v, pos, valid
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
            self.pos = torch.cat((self.pos, pos), dim=1)
            self.valid = torch.cat((self.valid, valid), dim=1)
        return self.k, self.v, self.pos, self.valid

    def num_tokens(self) -> int:
        """Number of real (non-padding) cached key/value pairs."""
        return 0 if self.valid is None else int(self.valid.sum())


class MoRCache:
    """KV caches of one Mixture-of-Recursions module (moe.mor), keyed (recursion step r, layer j
    of the shared block). recursion_wise: every step caches its own selected tokens (Bae et al.
    2025 §2.2.2, memory (Nr+1)/2Nr of vanilla under the default schedule); recursive_sharing:
    only step 0 caches (memory 1/Nr)."""

    def __init__(self):
        self.sites: dict = {}

    def site(self, r: int, j: int) -> KVCache:
        return self.sites.setdefault((r, j), KVCache())

    def num_tokens(self) -> int:
        return sum(c.num_tokens() for c in self.sites.values())


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, Eq. 1) with RoPE, on SDPA.

    Token i attends key j iff pos_j <= pos_i and j is valid, so a call on a subset of tokens
    gives attention among that subset at its original positions. `flops` counts the multiply-
    adds of QK^T and PV (4*B*G*S*U*A per call) from the shapes actually sent to SDPA.
    """

    def __init__(self, dim: int, n_heads: int, *, rope_base: float = 10000.0):
        super().__init__()
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"n_heads={n_heads} must be >= 1 and divide dim={dim}")
        if (dim // n_heads) % 2:
            raise ValueError(f"head dim dim/n_heads={dim // n_heads} must be even for rotary")
        self.n_heads, self.rope_base = n_heads, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.flops = 0

    def forward(self, x_BSD, pos_BS, valid_BS, cache: KVCache | None = None, shared_kv=None):
        """x_BSD -> (B, S, D). `shared_kv` is a cache whose keys/values are used instead of
        this call's (recursive KV sharing); otherwise new K/V are appended to `cache`.
        pos_BS and valid_BS both None: every row is a whole sequence from position 0 (no padding,
        no cache), the plain causal mask, which SDPA applies itself (is_causal)."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if pos_BS is None and valid_BS is None and cache is None and shared_kv is None:
            pos_1S = torch.arange(S, device=x_BSD.device)[None]
            q, k = rotary(q, pos_1S, self.rope_base), rotary(k, pos_1S, self.rope_base)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            self.flops += 4 * B * self.n_heads * S * S * q.shape[-1]
            return self.out(y.transpose(1, 2).reshape(B, S, D))
        if pos_BS is None or valid_BS is None:
            raise ValueError("CausalSelfAttention: pos_BS and valid_BS are given together (or both None "
                             "for whole sequences without a cache)")
        q = rotary(q, pos_BS, self.rope_base)
        if shared_kv is not None:
            k, v, kpos_BU, kvalid_BU = shared_kv.k, shared_kv.v, shared_kv.pos, shared_kv.valid
        else:
            k = rotary(k, pos_BS, self.rope_base)
            kpos_BU, kvalid_BU = pos_BS, valid_BS
            if cache is not None:
                k, v, kpos_BU, kvalid_BU = cache.append(k, v, pos_BS, valid_BS)
        allow_BSU = (kpos_BU[:, None, :] <= pos_BS[:, :, None]) & kvalid_BU[:, None, :]
        any_BS1 = allow_BSU.any(-1, keepdim=True)  # padding queries may see no key at all
        allow_BSU = allow_BSU | ~any_BS1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allow_BSU[:, None])
        self.flops += 4 * B * self.n_heads * S * k.shape[2] * q.shape[-1]
        y = y * any_BS1[:, None].to(y.dtype)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU FFN (Shazeer 2020, Eq. 6): W2(silu(x W1) * x W3); x (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class DecoderBlock(nn.Module):
    """Pre-norm block: h = x + Attn(Norm(x)); y = h + MLP(Norm(h)) (Llama; Touvron et al. 2023).

    `mlp` is any module mapping (..., D) -> (..., D): a SwiGLUMLP (default) or a moe.MoELayer.
    Only valid tokens reach the MLP (as an (N, D) batch), so padding never takes routing slots.
    forward(x_BSD, pos_BS=None, valid_BS=None, cache=None, shared_kv=None, input_ids=None) -> y_BSD;
    input_ids (B, S) reach an MLP whose router routes on token ids (``routes_on_input_ids``).
    """

    def __init__(self, dim: int, n_heads: int, *, mlp: nn.Module | None = None,
                 mlp_hidden: int | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-6):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = CausalSelfAttention(dim, n_heads, rope_base=rope_base)
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = mlp if mlp is not None else SwiGLUMLP(dim, mlp_hidden or 4 * dim)

    def new_cache(self) -> KVCache:
        return KVCache()

    @property
    def routes_on_input_ids(self) -> bool:
        """True when the MLP routes on token ids (a MoELayer with routers.HashRouter)."""
        return bool(getattr(self.mlp, "routes_on_input_ids", False))

    def forward(self, x_BSD, pos_BS=None, valid_BS=None, cache=None, shared_kv=None, input_ids=None):
        B, S, _ = x_BSD.shape
        plain = pos_BS is None and valid_BS is None and cache is None and shared_kv is None
        if not plain:
            if pos_BS is None:
                pos_BS = torch.arange(S, device=x_BSD.device).expand(B, S)
            if valid_BS is None:
                valid_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        h = x_BSD + self.attn(self.attn_norm(x_BSD), pos_BS, valid_BS, cache, shared_kv)
        z = self.mlp_norm(h)
        ids = input_ids is not None and self.routes_on_input_ids
        if plain or bool(valid_BS.all()):
            return h + (self.mlp(z, input_ids=input_ids) if ids else self.mlp(z))
        out = torch.zeros_like(h)
        out[valid_BS] = self.mlp(z[valid_BS], input_ids=input_ids[valid_BS]) if ids else self.mlp(z[valid_BS])
        return h + out


@dataclass
class LMCache:
    """Per-layer caches of a CausalLM plus the next absolute position of each row (next_pos_B)."""

    layers: list
    next_pos_B: torch.Tensor | None = None

    def num_tokens(self) -> int:
        """Real key/value pairs held over all attention sites (the KV memory in tokens)."""
        return sum(c.num_tokens() for c in self.layers)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None  # next-token cross-entropy, None without labels
    aux_losses: dict  # moe.collect_aux_losses(model, by_name=True): name -> total over modules
    cache: LMCache | None = None

    @property
    def aux_loss(self) -> torch.Tensor:
        """Deprecated: the sum of ``aux_losses`` (``moe.collect_aux_losses(model)``)."""
        warnings.warn("LMOutput.aux_loss is deprecated: use sum(out.aux_losses.values()) or "
                      "moe.collect_aux_losses(model)", DeprecationWarning, stacklevel=2)
        return sum(self.aux_losses.values(), self.logits.new_zeros(()))


class CausalLM(nn.Module):
    """Embedding -> layers -> RMSNorm -> head. A layer is any module called as
    layer(x_BSD, pos_BS, valid_BS, cache) -> x_BSD with a `new_cache()` method (DecoderBlock,
    moe.MixtureOfRecursions); a layer whose ``routes_on_input_ids`` is True (a DecoderBlock with a
    hash-routed MoELayer) also gets ``input_ids=`` (B, S)."""

    def __init__(self, vocab_size: int, dim: int, layers, *, norm_eps: float = 1e-6):
        super().__init__()
        if vocab_size < 1 or dim < 1:
            raise ValueError(f"vocab_size={vocab_size} and dim={dim} must be >= 1")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def new_cache(self) -> LMCache:
        return LMCache([layer.new_cache() for layer in self.layers])

    def _check(self, input_ids, attention_mask):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer (B, S) tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")

    def forward(self, input_ids, *, labels=None, attention_mask=None, cache: LMCache | None = None):
        """input_ids (B, S) -> LMOutput. attention_mask (B, S), 1 = real token (left or right
        padding); positions count real tokens only and continue from `cache`. labels (B, S) are
        the input ids (shifted inside; -100 and padding ignored)."""
        self._check(input_ids, attention_mask)
        B, S = input_ids.shape
        caches = cache.layers if cache is not None else [None] * len(self.layers)
        if attention_mask is None and cache is None:  # whole sequences: the plain causal mask
            valid_BS = pos_BS = None
        else:
            valid_BS = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                        else attention_mask.bool())
            start_B = (cache.next_pos_B if cache is not None and cache.next_pos_B is not None
                       else torch.zeros(B, dtype=torch.long, device=input_ids.device))
            pos_BS = start_B[:, None] + (valid_BS.long().cumsum(1) - 1).clamp(min=0)
        x = self.embed(input_ids)
        for layer, c in zip(self.layers, caches):
            ids = {"input_ids": input_ids} if getattr(layer, "routes_on_input_ids", False) else {}
            x = layer(x, pos_BS, valid_BS, c, **ids)
        logits = self.head(self.norm(x))
        if cache is not None:
            cache.next_pos_B = start_B + valid_BS.long().sum(1)
        loss = None
        if labels is not None:
            tgt = (labels if valid_BS is None else labels.masked_fill(~valid_BS, -100))[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab_size),
                                   tgt.reshape(-1).long(), ignore_index=-100)
        return LMOutput(logits, loss, collect_aux_losses(self, by_name=True), cache)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None,
                 temperature: float = 0.0, generator: torch.Generator | None = None):
        """Greedy (temperature 0) or sampled decoding with the KV cache, in eval mode.
        input_ids (B, S), left padding allowed via attention_mask -> (B, S + max_new_tokens)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        was_training = self.training
        self.eval()
        try:
            cache, ids, out = self.new_cache(), input_ids, [input_ids]
            mask = attention_mask
            for _ in range(max_new_tokens):
                logits = self(ids, attention_mask=mask, cache=cache).logits[:, -1]
                if temperature > 0:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    ids = torch.multinomial(probs, 1, generator=generator)
                else:
                    ids = logits.argmax(-1, keepdim=True)
                out.append(ids)
                mask = None
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


MOE_ROUTERS = ("topk", "sbase", "hash")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The MoE FFN of every block of :func:`build_lm`: E experts of hidden F, top_k, and the router.

    router: "topk" (routers.TopKRouter: softmax top-k, Switch balancing loss), "sbase"
    (routers.SBaseRouter: Sinkhorn-balanced top-k in training, plain top-k at inference; Clark et
    al. 2022) or "hash" (routers.HashRouter: fixed balanced experts per token id, Roller et al.
    2021; the LM passes its input_ids; layer i hashes with seed i unless router_kwargs sets seed).
    router_kwargs go to the router's constructor; num_shared_experts as moe.MoELayer.
    """

    num_experts: int
    ffn_hidden_size: int
    top_k: int = 2
    router: str = "topk"
    num_shared_experts: int = 0
    router_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.router not in MOE_ROUTERS:
            raise ValueError(f"router must be one of {MOE_ROUTERS}, got {self.router!r}")
        if not isinstance(self.router_kwargs, dict):
            raise TypeError(f"router_kwargs must be a dict, got {type(self.router_kwargs).__name__}")

    def make_layer(self, dim: int, vocab_size: int, layer_index: int) -> MoELayer:
        """The MoELayer of block ``layer_index`` of a (vocab_size, dim) LM."""
        import routers

        E, K, kw = self.num_experts, self.top_k, dict(self.router_kwargs)
        if self.router == "topk":
            router = routers.TopKRouter(dim, E, K, **kw)
        elif self.router == "sbase":
            router = routers.SBaseRouter(dim, E, K, **kw)
        else:
            kw.setdefault("seed", layer_index)
            router = routers.HashRouter(dim, E, vocab_size, K, **kw)
        return MoELayer(dim, self.ffn_hidden_size, E, router=router, num_shared_experts=self.num_shared_experts)


def build_lm(*, vocab_size: int, dim: int, n_layers: int, n_heads: int,
             mlp_hidden: int | None = None, mlp_factory=None, moe: MoEConfig | None = None) -> CausalLM:
    """A vanilla LM of n_layers unique DecoderBlocks; mlp_factory(layer_index) -> nn.Module
    (e.g. a moe.MoELayer) replaces the dense SwiGLU MLP, or ``moe`` (a MoEConfig) makes every
    block's MLP a MoELayer with the router it names."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1")
    if moe is not None:
        if mlp_factory is not None:
            raise ValueError("pass either mlp_factory or moe, not both")
        if not isinstance(moe, MoEConfig):
            raise TypeError(f"moe must be a moe.model.MoEConfig, got {type(moe).__name__}")
        mlp_factory = lambda i: moe.make_layer(dim, vocab_size, i)  # noqa: E731
    blocks = [DecoderBlock(dim, n_heads, mlp_hidden=mlp_hidden,
                           mlp=mlp_factory(i) if mlp_factory else None) for i in range(n_layers)]
    return CausalLM(vocab_size, dim, blocks)
