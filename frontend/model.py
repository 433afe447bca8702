"""The DeepSeek-V4 step function: the project's eager reference and what the frontend traces.

``step(ctx, params, cache, input_ids, start_pos)`` runs S new tokens of B sequences (sequence b starts at
absolute position ``start_pos[b]``) through the model, updates ``cache`` in place and returns the
last position's logits. Prefill is S = prompt length, decode is S = 1; both use this one function, so
decode equals prefill by construction of the math rather than by a second implementation.

Shapes are static given (B, S) and the cache capacity: compressor windows, entry emission, the
window ring buffer and top-k selection are written with gathers and masks, never with data-dependent
Python control flow, so ``torch.export`` can trace it with B and S symbolic.

Model primitives are ``torch.ops.dsv4`` ops; clamps, SwiGLU, norms and RoPE stay plain aten ops so that
the passes have real patterns to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

import dsv4c.ops  # noqa: F401  (registers torch.ops.dsv4)
from dsv4c.layout import block_prefix, default_kv_storage, kv_storage_problem
from dsv4c.ops.library import select_visible_topk
from dsv4c.rope import apply_rope
from dsv4c.spec import ModelSpec

dsv4 = torch.ops.dsv4
NUMERICS = ("reference", "exact")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class StepContext:
    """What a traced step is specialized on: the spec, the numerics mode and the activation dtype."""

    spec: ModelSpec
    numerics: str = "reference"
    dtype: torch.dtype = torch.bfloat16
    # How the KV cache holds its entries: "packed" (storage format, see dsv4c.ops.kv_storage) or "dense"
    # (activation dtype). None = derived: packed exactly when it is lossless (dsv4c.layout.default_kv_storage).
    kv_storage: str | None = None

    def __post_init__(self) -> None:
        if self.kv_storage is None:
            object.__setattr__(self, "kv_storage", default_kv_storage(self.spec, self.numerics, self.dtype))
        problem = kv_storage_problem(self.spec, self.numerics, self.dtype, self.kv_storage)
        if problem:
            raise ValueError(problem)

    @property
    def packed_kv(self) -> bool:
        """Whether the cache holds entries in their storage format (FP8/FP4 codes + ue8m0 scale bytes)."""
        return self.kv_storage == "packed"

    @property
    def simulate(self) -> bool:
        """Whether the quant-dequant simulations and activation quantization are part of the math."""
        return self.numerics == "reference"

    @property
    def ue8m0(self) -> bool:
        return self.spec.scale_fmt == "ue8m0"


P = Mapping[str, Tensor]


# ---- small pieces ---------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def fp8_linear(ctx: StepContext, x: Tensor, params: P, name: str) -> Tensor:
    return dsv4.fp8_linear(x, params[f"{name}.weight"], params[f"{name}.scale"], ctx.simulate, ctx.ue8m0)


def dense_f32(x: Tensor, w: Tensor) -> Tensor:
    """A bf16-stored weight applied in fp32."""
    return x.float() @ w.float().t()


def swiglu(g: Tensor, v: Tensor, limit: float, weight: Tensor | None = None) -> Tensor:
    """silu(min(g, L)) * clamp(v, -L, L) (* routing weight), fp32. Written out so the pass can match it."""
    h = torch.nn.functional.silu(torch.clamp(g.float(), max=limit)) * torch.clamp(v.float(), -limit, limit)
    if weight is not None:
        h = h * weight.float()[:, None]
    return h


# ---- mHC -------------------------------------------------------------------------------------------

def hc_pre(ctx: StepContext, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Streams [B, S, n, D] -> (sub-layer input u [B, S, D], post [B, S, n], comb [B, S, n, n])."""
    s = ctx.spec
    xf = x.flatten(2).float()
    mix = (xf @ fn.float().t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + s.rms_norm_eps)
    pre, post, comb = dsv4.hc_split(mix, base, scale, s.hc_mult, s.hc_sinkhorn_iters, s.hc_eps)
    u = (pre[..., None] * x.float()).sum(dim=2).to(x.dtype)
    return u, post, comb


def hc_post(o: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """stream'[j] = post[j] * o + sum_i comb[i][j] * stream[i], cast to o's dtype."""
    mixed = torch.einsum("bsij,bsid->bsjd", comb, x.float())
    return (post[..., None] * o.float()[:, :, None, :] + mixed).to(o.dtype)


def hc_head(ctx: StepContext, x: Tensor, params: P, p: str) -> Tensor:
    s = ctx.spec
    xf = x.flatten(2).float()
    mix = (xf @ params[f"{p}hc_head_fn"].float().t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + s.rms_norm_eps)
    pre = torch.sigmoid(mix * params[f"{p}hc_head_scale"].float() + params[f"{p}hc_head_base"].float()) + s.hc_eps
    return (pre[..., None] * x.float()).sum(dim=2).to(x.dtype)


# ---- the cache in storage format ----------------------------------------------------------------------

def _bytes(t: Tensor) -> Tensor:
    """FP8 tensors are moved as their bytes (gather / scatter / where have no float8 kernels on CPU)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _write_rows(dst: Tensor, rows: Tensor, ok: Tensor, val: Tensor) -> None:
    """dst[b, rows[b, w]] = val[b, w] where ok[b, w]; elsewhere the row keeps what it holds.
    dst [B, N, k], rows / ok [B, W], val [B, W, k]."""
    d, v = _bytes(dst), _bytes(val)
    idx = rows[..., None].expand(*rows.shape, d.shape[-1])
    d.scatter_(1, idx, torch.where(ok[..., None], v, d.gather(1, idx)))


# ---- compressor ------------------------------------------------------------------------------------

def compressor(ctx: StepContext, u: Tensor, pos: Tensor, start: Tensor, params: P, cp: str, cache: dict[str, Tensor],
               cache_prefix: str, entries_name: str, ratio: int, overlap: bool, quant_mode: int,
               freqs: Tensor, hadamard: Tensor | None) -> Tensor | tuple[Tensor, ...]:
    """Run one compressor over this call's tokens; write the completed entries and the open-window
    state into the cache; return the block's entry cache [B, cap, d] (packed storage: its parts, see
    ``dsv4c.layout.cache_tensors``).

    Windows are aligned to multiples of ``ratio``. The tokens of window w (relative to the window that
    holds ``start``) come either from the cached open-window state or from this call."""
    s = ctx.spec
    B, S, _ = u.shape
    m = ratio
    a_new = dense_f32(u, params[f"{cp}.wkv.weight"])
    z_new = dense_f32(u, params[f"{cp}.wgate.weight"]) + params[f"{cp}.ape"].float()[pos % m]
    kd = a_new.shape[-1]
    d = kd // 2 if overlap else kd
    st_a, st_z = cache[cache_prefix + "_a"], cache[cache_prefix + "_z"]
    n_win = (S + m - 1) // m + 1
    dev = u.device
    w_ar = torch.arange(n_win, device=dev)
    r_ar = torch.arange(m, device=dev)
    w0 = (start // m) * m  # [B] first position of the window that holds start
    p_tok = w0[:, None, None] + w_ar[None, :, None] * m + r_ar[None, None, :]  # [B, W, m]
    from_state = p_tok < start[:, None, None]
    src = torch.where(from_state, p_tok - w0[:, None, None], m + p_tok - start[:, None, None])
    src = src.clamp(0, m + S - 1)
    b_idx = torch.arange(B, device=dev)[:, None, None]
    a_win = torch.cat((st_a, a_new), dim=1)[b_idx, src]  # [B, W, m, kd]
    z_win = torch.cat((st_z, z_new), dim=1)[b_idx, src]
    j = w0[:, None] // m + w_ar[None, :]  # entry index of each window [B, W]
    complete = (w0[:, None] + (w_ar[None, :] + 1) * m) <= (start + S)[:, None]
    if overlap:
        # The previous window's first halves, gathered from [cached previous window | open-window state | new].
        pa, pz = cache[cache_prefix + "_pa"], cache[cache_prefix + "_pz"]
        p_prev = p_tok - m
        src_prev = torch.where(p_prev < w0[:, None, None], p_prev - w0[:, None, None] + m,
                               torch.where(p_prev < start[:, None, None], m + p_prev - w0[:, None, None],
                                           2 * m + p_prev - start[:, None, None]))
        src_prev = src_prev.clamp(0, 2 * m + S - 1)
        a_prev = torch.cat((pa, st_a[..., :d], a_new[..., :d]), dim=1)[b_idx, src_prev]
        z_prev = torch.cat((pz, st_z[..., :d], z_new[..., :d]), dim=1)[b_idx, src_prev]
        z_prev = torch.where((j == 0)[:, :, None, None], torch.full_like(z_prev, float("-inf")), z_prev)
    else:
        a_prev = z_prev = a_win.new_zeros((B, n_win, 0, 0))
    # Packed storage: the quantization is the pack itself (kv_pack / fp4_pack), not a quant-dequant.
    pack = ctx.packed_kv and quant_mode in (1, 2)
    if pack:
        quant_mode = 0 if quant_mode == 1 else 3
    # Pooling, then the per-entry finish: cast, RMSNorm, RoPE at the window's first position, quantization.
    e = dsv4.compress_pool(a_win, z_win, a_prev, z_prev, overlap).to(ctx.dtype)
    e = rms_norm(e, params[f"{cp}.norm.weight"], s.rms_norm_eps)
    e = apply_rope(e, j * m, freqs)
    r = s.rope_dim
    if quant_mode == 1:
        e = torch.cat((dsv4.fp8_qdq(e[..., :-r], 64, ctx.ue8m0), e[..., -r:]), dim=-1)
    elif quant_mode in (2, 3):
        e = (e.float() @ hadamard.float()).to(ctx.dtype)
        if quant_mode == 2:
            e = dsv4.fp4_qdq(e, 32)
    # Write completed entries at their index; open windows write back what is there.
    base = cache_prefix[:-1] + entries_name
    if pack:
        names = ("_nope", "_scale", "_rope") if entries_name == "ckv" else ("_codes", "_scale")
        parts = dsv4.kv_pack(e, r) if entries_name == "ckv" else dsv4.fp4_pack(e, 32)
        ent = tuple(cache[base + nm] for nm in names)
        jcl = j.clamp(max=ent[0].shape[1] - 1)
        for t, v in zip(ent, parts):
            _write_rows(t, jcl, complete, v)
    else:
        ent = cache[base]
        jc = j.clamp(max=ent.shape[1] - 1)[..., None].expand(B, n_win, d)
        ent.scatter_(1, jc, torch.where(complete[..., None], e, ent.gather(1, jc)))
    # The open window after this call, and (overlap) the first halves of the window before it.
    w_open = (start % m + S) // m  # [B]
    bsel = torch.arange(B, device=dev)
    st_a.copy_(a_win[bsel, w_open])
    st_z.copy_(z_win[bsel, w_open])
    if overlap:
        cache[cache_prefix + "_pa"].copy_(a_prev[bsel, w_open])
        cache[cache_prefix + "_pz"].copy_(z_prev[bsel, w_open])
    return ent


# ---- attention -------------------------------------------------------------------------------------

def attention(ctx: StepContext, u: Tensor, pos: Tensor, start: Tensor, params: P, p: str, i: int,
              cache: dict[str, Tensor], consts: P) -> Tensor:
    s = ctx.spec
    B, S, _ = u.shape
    H, c, r, nw = s.num_heads, s.head_dim, s.rope_dim, s.sliding_window
    a = f"{p}attn"
    kind = s.attn_kind(i)
    freqs = consts["rope.window"] if kind == "window" else consts["rope.compress"]
    dev = u.device

    qr = rms_norm(fp8_linear(ctx, u, params, f"{a}.wq_a"), params[f"{a}.q_norm.weight"], s.rms_norm_eps)
    q = fp8_linear(ctx, qr, params, f"{a}.wq_b").view(B, S, H, c)
    q = apply_rope(rms_norm(q, None, s.rms_norm_eps), pos, freqs)
    kv = rms_norm(fp8_linear(ctx, u, params, f"{a}.wkv"), params[f"{a}.kv_norm.weight"], s.rms_norm_eps)
    kv = apply_rope(kv, pos, freqs)
    kv_raw = kv
    if ctx.simulate:
        kv = torch.cat((dsv4.fp8_qdq(kv[..., :-r], 64, ctx.ue8m0), kv[..., -r:]), dim=-1)

    # Window keys: the ring buffer (positions before start) followed by this call's tokens.
    if ctx.packed_kv:
        win = tuple(cache[f"b{i}.win{nm}"] for nm in ("_nope", "_scale", "_rope"))
        ring = dsv4.kv_unpack(*win)
    else:
        ring = cache[f"b{i}.win"]
    slot = torch.arange(nw, device=dev)
    last = start[:, None] - 1
    ring_pos = last - torch.remainder(last - slot, nw)  # [B, nw]; negative = empty slot
    keys = torch.cat((ring, kv), dim=1)
    key_pos = torch.cat((ring_pos, pos), dim=1)
    key_ok = torch.cat((ring_pos >= 0, torch.ones_like(pos, dtype=torch.bool)), dim=1)
    qp = pos[:, :, None]
    win_mask = key_ok[:, None, :] & (key_pos[:, None, :] <= qp) & (key_pos[:, None, :] > qp - nw)
    end_last = (start + S - 1)[:, None]
    newest = end_last - torch.remainder(end_last - slot, nw)
    take_new = (newest >= start[:, None])[..., None]
    src = (newest - start[:, None]).clamp(0, S - 1)[..., None].expand(B, nw, c)
    if ctx.packed_kv:
        # The ring takes the storage format of this call's keys (kv_pack of the pre-quantization values:
        # kv_unpack of it is bitwise the quant-dequantized kv the attention below uses).
        for t, v in zip(win, dsv4.kv_pack(kv_raw.gather(1, src), r)):
            tb = _bytes(t)
            tb.copy_(torch.where(take_new, _bytes(v), tb))
    else:
        ring.copy_(torch.where(take_new, kv.gather(1, src), ring))

    if kind == "window":
        comp = kv.new_zeros((B, 0, c))
        idx = torch.zeros((B, S, 0), dtype=torch.long, device=dev)
    else:
        m = s.compress_ratios[i]
        overlap = kind == "csa"
        comp = compressor(ctx, u, pos, start, params, f"{a}.compressor", cache, f"b{i}.c", "ckv", m, overlap,
                          1 if ctx.simulate else 0, freqs, None)
        visible = (pos + 1) // m  # entries a query may see
        if kind == "csa":
            idx = indexer(ctx, u, qr, pos, start, params, a, i, cache, consts, visible)
        else:
            n_ent = comp[0].shape[1] if isinstance(comp, tuple) else comp.shape[1]
            ent = torch.arange(n_ent, device=dev)
            idx = torch.where(ent < visible[..., None], ent, torch.full_like(ent, -1))
    if isinstance(comp, tuple):  # packed storage
        o = dsv4.sparse_attn_packed(q, keys, win_mask, *comp, idx, params[f"{a}.attn_sink"], c ** -0.5)
    else:
        o = dsv4.sparse_attn(q, keys, win_mask, comp, idx, params[f"{a}.attn_sink"], c ** -0.5)
    o = apply_rope(o, pos, freqs, inverse=True)
    g = s.o_groups
    wo_a = params[f"{a}.wo_a.weight"].to(ctx.dtype).view(g, s.o_lora_rank, s.o_group_in)
    z = torch.einsum("bsgk,gdk->bsgd", o.reshape(B, S, g, s.o_group_in), wo_a).flatten(2)
    return fp8_linear(ctx, z, params, f"{a}.wo_b")


def indexer(ctx: StepContext, u: Tensor, qr: Tensor, pos: Tensor, start: Tensor, params: P, a: str, i: int,
            cache: dict[str, Tensor], consts: P, visible: Tensor) -> Tensor:
    """Lightning indexer: compress indexer keys, score every visible entry, keep the top k."""
    s = ctx.spec
    B, S, _ = u.shape
    nI, dI = s.index_n_heads, s.index_head_dim
    freqs, had = consts["rope.compress"], consts["hadamard"]
    keys = compressor(ctx, u, pos, start, params, f"{a}.indexer.compressor", cache, f"b{i}.i", "ikv",
                      s.compress_ratios[i], True, 2 if ctx.simulate else 3, freqs, had)
    q = fp8_linear(ctx, qr, params, f"{a}.indexer.wq_b").view(B, S, nI, dI)
    q = apply_rope(q, pos, freqs)
    q = (q.float() @ had.float()).to(ctx.dtype)
    if ctx.simulate:
        q = dsv4.fp4_qdq(q, 32)
    w = dense_f32(u, params[f"{a}.indexer.weights_proj.weight"]) * (dI ** -0.5 * nI ** -0.5)
    if isinstance(keys, tuple):  # packed storage: e2m1 codes + ue8m0 bytes
        scores = dsv4.indexer_score_packed(q, *keys, w)
        n_ent = keys[0].shape[1]
    else:
        scores = dsv4.indexer_score(q, keys, w)
        n_ent = keys.shape[1]
    return select_visible_topk(scores, visible, min(s.index_topk, n_ent))


# ---- MoE -------------------------------------------------------------------------------------------

def moe(ctx: StepContext, u: Tensor, ids: Tensor, params: P, p: str, i: int) -> Tensor:
    s = ctx.spec
    B, S, D = u.shape
    f = f"{p}ffn"
    k, L = s.num_experts_per_tok, s.swiglu_limit
    x = u.reshape(B * S, D)
    logits = dense_f32(x, params[f"{f}.gate.weight"])
    if s.scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif s.scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = torch.sqrt(torch.nn.functional.softplus(logits))
    if s.route_kind(i) == "hash":
        sel = params[f"{f}.gate.tid2eid"][ids.reshape(-1)].long()
    else:
        sel = torch.topk(scores + params[f"{f}.gate.bias"].float(), k, dim=-1).indices
    w = scores.gather(1, sel)
    if s.scoring_func != "softmax":
        w = w / w.sum(-1, keepdim=True)
    w = w * s.routed_scaling_factor
    # Token dispatch: one row per (token, chosen expert).
    tok = torch.arange(B * S, device=u.device).repeat_interleave(k)
    expert = sel.reshape(-1)
    xa = x[tok]
    e = f"{f}.experts"
    g = dsv4.fp4_grouped_linear(xa, expert, params[f"{e}.w1.weight"], params[f"{e}.w1.scale"], ctx.simulate, ctx.ue8m0)
    v = dsv4.fp4_grouped_linear(xa, expert, params[f"{e}.w3.weight"], params[f"{e}.w3.scale"], ctx.simulate, ctx.ue8m0)
    h = swiglu(g, v, L, w.reshape(-1))
    y = dsv4.fp4_grouped_linear(h.to(ctx.dtype), expert, params[f"{e}.w2.weight"], params[f"{e}.w2.scale"],
                                ctx.simulate, ctx.ue8m0)
    out = torch.zeros(B * S, D, dtype=torch.float32, device=u.device).index_add(0, tok, y.float())
    if s.n_shared_experts:
        se = f"{f}.shared_experts"
        hs = swiglu(fp8_linear(ctx, x, params, f"{se}.w1"), fp8_linear(ctx, x, params, f"{se}.w3"), L)
        out = out + fp8_linear(ctx, hs.to(ctx.dtype), params, f"{se}.w2").float()
    return out.to(ctx.dtype).view(B, S, D)


# ---- blocks and the step -----------------------------------------------------------------------------

def block(ctx: StepContext, x: Tensor, ids: Tensor, pos: Tensor, start: Tensor, params: P, i: int,
          cache: dict[str, Tensor], consts: P) -> Tensor:
    s = ctx.spec
    p = block_prefix(s, i)
    u, post, comb = hc_pre(ctx, x, params[f"{p}hc_attn_fn"], params[f"{p}hc_attn_base"], params[f"{p}hc_attn_scale"])
    u = rms_norm(u, params[f"{p}attn_norm.weight"], s.rms_norm_eps)
    x = hc_post(attention(ctx, u, pos, start, params, p, i, cache, consts), x, post, comb)
    u, post, comb = hc_pre(ctx, x, params[f"{p}hc_ffn_fn"], params[f"{p}hc_ffn_base"], params[f"{p}hc_ffn_scale"])
    u = rms_norm(u, params[f"{p}ffn_norm.weight"], s.rms_norm_eps)
    return hc_post(moe(ctx, u, ids, params, p, i), x, post, comb)


def embed(ctx: StepContext, params: P, input_ids: Tensor, start_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Token embeddings expanded to the n_hc residual streams [B, S, n, D], and absolute positions [B, S]."""
    s = ctx.spec
    B, S = input_ids.shape
    pos = start_pos[:, None] + torch.arange(S, device=input_ids.device)[None, :]
    h = params["embed.weight"][input_ids].to(ctx.dtype)
    return h[:, :, None, :].expand(B, S, s.hc_mult, s.hidden_size), pos


def head(ctx: StepContext, params: P, x: Tensor) -> Tensor:
    """Collapse the streams (hc_head), final norm, logits of the last position in fp32."""
    y = rms_norm(hc_head(ctx, x, params, ""), params["norm.weight"], ctx.spec.rms_norm_eps)
    return y[:, -1].float() @ params["head.weight"].float().t()


def step(ctx: StepContext, params: P, consts: P, cache: dict[str, Tensor], input_ids: Tensor,
         start_pos: Tensor) -> Tensor:
    """S new tokens per sequence -> logits of the last one [B, vocab] (fp32); the cache is updated in place."""
    x, pos = embed(ctx, params, input_ids, start_pos)
    for i in range(ctx.spec.num_layers):
        x = block(ctx, x, input_ids, pos, start_pos, params, i, cache, consts)
    return head(ctx, params, x)


def constants(spec: ModelSpec) -> dict[str, Tensor]:
    """Tensors the step needs besides weights: RoPE frequency tables and the Hadamard matrix."""
    from dsv4c.quant import hadamard_matrix
    from dsv4c.rope import inv_freq

    return {
        "rope.window": inv_freq(spec, compressed=False),
        "rope.compress": inv_freq(spec, compressed=True),
        "hadamard": hadamard_matrix(spec.index_head_dim),
    }
