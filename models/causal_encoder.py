"""DiffusionGemma's causal encoder as one lean forward over a slot KV cache, for AR decoding.

transformers' encoder (``DiffusionGemmaEncoderTextModel``) runs the math through ~11 modules per
layer, a mask builder and a grouped-expert dispatch; on the embedded checkpoint (hidden 128) that
Python costs ~7 ms per decode step, the arithmetic well under one. Here the layer is ~60 tensor
ops over the model's own weights (a few fused copies: q|k|v, gate|up, the experts' down):

* tokens are flat, ``[tokens, hidden]``: rows with different numbers of new tokens (one, several
  after a grammar's jump-forward, a whole prompt) carry no padding through the matmuls; only the
  attention lays the queries out per row;
* q and k are normalised and rotated together, cos/sin read from a table by position;
* the routed experts: every expert on every token, weighted by the router's top-k weights
  scattered into a dense ``[tokens, experts]`` matrix (two matmuls) for a decode step; one
  matmul pair per expert over the tokens routed to it for a prefill;
* the KV cache is a :class:`SlotKV`: row ``s`` of a batch owns slot ``s``, its token at position
  ``p`` sits in column ``p``. A row joins by writing its own slot and leaves by the slots behind it
  moving up; no row pads another, and every row computes what it computes alone.

:func:`lean_encoder` returns None for a configuration this module does not reproduce (then the
batcher runs transformers' forward). ``tests/unit/test_causal_encoder.py`` holds it to transformers'
logits and greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .architecture import softcapped

# Beyond this many experts, running every expert on every token costs more than routing saves.
MAX_DENSE_EXPERTS = 16
# Up to this many tokens in a forward, every expert runs on every token (fewer, larger ops).
DENSE_EXPERT_TOKENS = 64


@dataclass(frozen=True)
class _Layer:
    sliding: bool
    heads: int
    kv_heads: int
    head_dim: int
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]; full layers (K = V): [(heads + kv_heads) * head_dim, hidden]
    qk_norm: torch.Tensor  # [heads + kv_heads, head_dim]: q_norm's weight per q head, then k_norm's per k head
    o_proj: torch.Tensor  # [hidden, heads * head_dim]
    input_norm: torch.Tensor  # [hidden], and so each norm below
    post_attention_norm: torch.Tensor
    pre_ff_norm: torch.Tensor  # before the dense MLP
    post_ff1_norm: torch.Tensor  # after the dense MLP
    pre_ff2_norm: torch.Tensor  # before the experts
    post_ff2_norm: torch.Tensor  # after the experts
    post_ff_norm: torch.Tensor  # after their sum
    gate_up: torch.Tensor  # [2 intermediate, hidden] (the dense MLP)
    down: torch.Tensor  # [hidden, intermediate]
    router_scale: torch.Tensor  # [hidden]: router.scale * hidden ** -0.5
    router_proj: torch.Tensor  # [experts, hidden]
    per_expert_scale: torch.Tensor  # [experts]
    experts_gate_up: torch.Tensor  # [experts, 2 moe_intermediate, hidden]
    experts_down: torch.Tensor  # [experts, hidden, moe_intermediate]
    experts_down_flat: torch.Tensor  # [hidden, experts * moe_intermediate]
    scalar: torch.Tensor | None  # [1]; None when it is 1


def lean_encoder(model) -> "CausalEncoder | None":
    """The lean forward of ``model`` (a ``DiffusionGemmaForBlockDiffusion``), or None when its
    configuration is one this module does not reproduce."""
    lm = model.model.encoder.language_model
    cfg = lm.config
    if cfg.use_bidirectional_attention == "all" or getattr(cfg, "use_clipped_linears", False):
        return None
    if cfg.num_experts > MAX_DENSE_EXPERTS or cfg.attention_bias or cfg.hidden_activation != "gelu_pytorch_tanh":
        return None
    if lm.embed_tokens.weight.dtype != torch.float32:  # transformers normalises in float32 whatever the weights
        return None
    return CausalEncoder(lm, model.lm_head.weight)


class SlotKV:
    """The KV of a batch of rows: per layer, keys and values [slots, kv_heads, capacity, head_dim];
    row ``s`` owns slot ``s`` and its token at position ``p`` is column ``p``. Grows on demand."""

    def __init__(self, encoder: "CausalEncoder", slots: int, capacity: int = 256):
        self.encoder = encoder
        self.slots, self.capacity = slots, capacity
        self.keys = self.values = None
        self._allocate(slots, capacity)

    def _allocate(self, slots: int, capacity: int) -> None:
        e = self.encoder
        old = (self.keys, self.values)
        self.keys = [e.embed.new_zeros(slots, L.kv_heads, capacity, L.head_dim) for L in e.layers]
        self.values = [e.embed.new_zeros(slots, L.kv_heads, capacity, L.head_dim) for L in e.layers]
        if old[0] is not None:
            s, c = min(slots, self.slots), min(capacity, self.capacity)
            for new, prev in zip(self.keys + self.values, old[0] + old[1]):
                new[:s, :, :c] = prev[:s, :, :c]
        self.slots, self.capacity = slots, capacity

    def ensure(self, slots: int, columns: int) -> None:
        """Room for ``slots`` rows of ``columns`` columns (capacities double)."""
        if slots > self.slots or columns > self.capacity:
            cap = self.capacity
            while cap < columns:
                cap *= 2
            self._allocate(max(slots, self.slots), cap)

    @torch.inference_mode()
    def move(self, src: Sequence[int], dst: Sequence[int], columns: int) -> None:
        """Slot ``src[i]`` copied into slot ``dst[i]``: the first ``columns`` columns, which hold
        everything a row has (no slot is both a source and a destination)."""
        dev = self.keys[0].device
        src_idx, dst_idx = torch.tensor(list(src), device=dev), torch.tensor(list(dst), device=dev)
        for t in self.keys + self.values:
            t[dst_idx, :, :columns] = t[src_idx, :, :columns]


class CausalEncoder:
    """The encoder's causal stack + tied head + softcap, over a :class:`SlotKV`."""

    def __init__(self, lm, head: torch.Tensor):
        cfg = lm.config
        self.eps = cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        self.window = cfg.sliding_window
        self.types = list(cfg.layer_types)
        self.embed = lm.embed_tokens.weight  # [vocab, hidden]
        self.embed_scale = float(lm.embed_tokens.scalar_embed_scale)
        self.final_norm = lm.norm.weight
        self.head = head  # [vocab, hidden]
        self.top_k = cfg.top_k_experts
        self.layers = [self._layer(cfg, i, layer) for i, layer in enumerate(lm.layers)]
        self._rotary = lm.rotary_emb
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_positions = 0
        self._rope_tables(cfg.max_position_embeddings)

    @staticmethod
    def _layer(cfg, i: int, layer) -> _Layer:
        a, pc = layer.self_attn, cfg.per_layer_config[i]
        heads, kv, d = cfg.num_attention_heads, pc.num_key_value_heads, pc.head_dim
        parts = [a.q_proj.weight, a.k_proj.weight] + ([a.v_proj.weight] if a.v_proj is not None else [])
        ex = layer.experts
        return _Layer(
            sliding=cfg.layer_types[i] == "sliding_attention", heads=heads, kv_heads=kv, head_dim=d,
            qkv=torch.cat(parts).detach(),
            qk_norm=torch.cat([a.q_norm.weight.expand(heads, d), a.k_norm.weight.expand(kv, d)]).detach(),
            o_proj=a.o_proj.weight,
            input_norm=layer.input_layernorm.weight, post_attention_norm=layer.post_attention_layernorm.weight,
            pre_ff_norm=layer.pre_feedforward_layernorm.weight, post_ff1_norm=layer.post_feedforward_layernorm_1.weight,
            pre_ff2_norm=layer.pre_feedforward_layernorm_2.weight,
            post_ff2_norm=layer.post_feedforward_layernorm_2.weight, post_ff_norm=layer.post_feedforward_layernorm.weight,
            gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach(),
            down=layer.mlp.down_proj.weight,
            router_scale=(layer.router.scale * cfg.hidden_size ** -0.5).detach(),
            router_proj=layer.router.proj.weight, per_expert_scale=layer.router.per_expert_scale,
            experts_gate_up=ex.gate_up_proj, experts_down=ex.down_proj,
            experts_down_flat=ex.down_proj.permute(1, 0, 2).reshape(ex.down_proj.shape[1], -1).detach().contiguous(),
            scalar=None if bool((layer.layer_scalar == 1).all()) else layer.layer_scalar,
        )

    def _rope_tables(self, n: int) -> None:
        """cos and a signed sin per layer type for positions ``0..n - 1``, computed as transformers
        computes them; ``rotate_half(x) * sin == x.roll(d / 2) * sin_signed`` (first half negated)."""
        for t in set(self.types):
            inv = getattr(self._rotary, f"{t}_inv_freq").float()
            scaling = getattr(self._rotary, f"{t}_attention_scaling")
            freqs = torch.arange(n, dtype=torch.float, device=inv.device)[:, None] * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * scaling, emb.sin() * scaling
            half = sin.shape[-1] // 2
            self._rope[t] = cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)
        self._rope_positions = n

    # -- the forward ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, kv: SlotKV, first: int, tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """Feed row ``r`` (slot ``first + r``) its ``tokens[r]`` at positions ``starts[r]..`` (what
        its slot holds before them: ``starts[r]`` columns), write their KV, and return the
        softcapped logits after each row's last token [rows, vocab] (float32)."""
        dev = self.embed.device
        counts = [len(t) for t in tokens]
        rows, k = len(tokens), max(counts)
        top = max(starts) + k  # columns the attention reads (every query position included)
        kv.ensure(first + rows, top)
        if top > self._rope_positions:
            self._rope_tables(max(top, 2 * self._rope_positions))
        ids = torch.tensor([t for row in tokens for t in row], dtype=torch.long, device=dev)
        uniform = all(c == k for c in counts)
        # every row laid out to k positions (its queries); a row's own tokens are its first ones
        qpos = torch.tensor(list(starts), device=dev)[:, None] + torch.arange(k, device=dev)  # [rows, k]
        if uniform:
            row_of = col = None
            pos = qpos.reshape(-1)  # [T]
        else:
            row_of = torch.repeat_interleave(torch.arange(rows, device=dev), torch.tensor(counts, device=dev))
            col = torch.cat([torch.arange(c, device=dev) for c in counts])
            pos = qpos[row_of, col]
        slot = first + (torch.arange(rows, device=dev).repeat_interleave(k) if uniform else row_of)  # [T]
        # per query: the columns it sees, per layer kind
        cols = torch.arange(top, device=dev)
        causal = cols <= qpos[..., None]  # [rows, k, top]
        masks = {False: causal.unsqueeze(1), True: (causal & (cols > qpos[..., None] - self.window)).unsqueeze(1)}
        rope = {t: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for t, (cos, sin) in self._rope.items()}  # [T, 1, d]
        layout = (rows, k, row_of, col)
        h = F.embedding(ids, self.embed) * self.embed_scale  # [T, hidden]
        for i, L in enumerate(self.layers):
            h = self._layer_forward(L, h, kv.keys[i], kv.values[i], first, slot, pos, masks[L.sliding],
                                    rope[self.types[i]], layout, top)
        last = torch.tensor(counts, device=dev).cumsum(0) - 1
        h = F.rms_norm(h[last], (self.hidden,), self.final_norm, self.eps)
        return softcapped(F.linear(h, self.head))

    def _layer_forward(self, L: _Layer, h, keys, values, first, slot, pos, mask, rope, layout, top) -> torch.Tensor:
        t = h.shape[0]
        eps, hid, d = self.eps, (self.hidden,), L.head_dim
        rows, k, row_of, col = layout
        x = F.rms_norm(h, hid, L.input_norm, eps)
        qkv = F.linear(x, L.qkv).view(t, -1, d)  # [T, heads + kv (+ kv), d]
        qk = F.rms_norm(qkv[:, :L.heads + L.kv_heads], (d,), None, eps) * L.qk_norm
        cos, sin = rope
        qk = qk * cos + qk.roll(d // 2, -1) * sin
        raw_v = qkv[:, L.heads + L.kv_heads:] if L.sliding else qkv[:, L.heads:]  # K = V on full layers
        keys[slot, :, pos] = qk[:, L.heads:]
        values[slot, :, pos] = F.rms_norm(raw_v, (d,), None, eps)
        q = qk[:, :L.heads]
        if row_of is None:
            q = q.reshape(rows, k, L.heads, d)
        else:
            q = q.new_zeros(rows, k, L.heads, d).index_put_((row_of, col), q)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[first:first + rows, :, :top], values[first:first + rows, :, :top],
            attn_mask=mask, scale=1.0, enable_gqa=L.heads != L.kv_heads).transpose(1, 2)  # [rows, k, heads, d]
        attn = attn.reshape(t, -1) if row_of is None else attn[row_of, col].reshape(t, -1)
        h = h + F.rms_norm(F.linear(attn, L.o_proj), hid, L.post_attention_norm, eps)

        # the dense MLP and the routed experts both read the same residual
        gate, up = F.linear(F.rms_norm(h, hid, L.pre_ff_norm, eps), L.gate_up).chunk(2, -1)
        dense = F.rms_norm(F.linear(F.gelu(gate, approximate="tanh") * up, L.down), hid, L.post_ff1_norm, eps)
        routed = F.rms_norm(self._experts(L, h), hid, L.post_ff2_norm, eps)
        h = h + F.rms_norm(dense + routed, hid, L.post_ff_norm, eps)
        return h if L.scalar is None else h * L.scalar

    def _experts(self, L: _Layer, h: torch.Tensor) -> torch.Tensor:
        """The routed block for tokens ``h`` [T, hidden], weighted by the router's normalised top-k."""
        hid = (self.hidden,)
        r = F.rms_norm(h, hid, None, self.eps) * L.router_scale
        probs = torch.softmax(F.linear(r, L.router_proj), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)) * L.per_expert_scale[idx]  # [T, top_k]
        x = F.rms_norm(h, hid, L.pre_ff2_norm, self.eps)
        n_experts = L.experts_gate_up.shape[0]
        if h.shape[0] <= DENSE_EXPERT_TOKENS:  # every expert on every token; the others weigh 0
            dense = torch.zeros_like(probs).scatter_(1, idx, w)  # [T, experts]
            gu = F.linear(x, L.experts_gate_up.reshape(-1, self.hidden)).view(h.shape[0], n_experts, -1)
            gate, up = gu.chunk(2, -1)
            z = F.gelu(gate, approximate="tanh") * up * dense.unsqueeze(-1)  # [T, experts, moe]
            return F.linear(z.reshape(h.shape[0], -1), L.experts_down_flat)
        out = torch.zeros_like(h)
        for e in range(n_experts):  # each expert over the tokens routed to it
            token, which = torch.where(idx == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], L.experts_gate_up[e]).chunk(2, -1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, L.experts_down[e])
            out.index_add_(0, token, y * w[token, which, None])
        return out
