"""ModelSpec: every number of the DeepSeek-V4 architecture, as one frozen dataclass.

Variants are data: ``pro`` and ``flash`` carry the published numbers; ``mini`` and ``tiny`` are small
models that keep every feature (window-only, CSA and HCA blocks, hash and top-k routing, shared
expert, mHC, an MTP block, FP8 block-scaled weights, FP4 experts).

``ModelSpec.from_config`` reads a hub ``config.json`` (``compress_ratios``, ``num_hash_layers``,
``qk_rope_head_dim``, ``rope_scaling``) or a transformers one (``layer_types``, ``compress_rates``,
``mlp_layer_types``, ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, show

SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
EXPERT_DTYPES = ("fp4", "fp8")
SCALE_FMTS = ("ue8m0", "float")
# Quantization block sizes fixed by the model family (MODEL-SEMANTICS section 7).
FP8_WEIGHT_BLOCK = 128
ACT_QUANT_BLOCK = 128
FP4_BLOCK = 32
KV_FP8_BLOCK = 64
CSA_RATIO = 4  # the overlapping compressor with a lightning indexer

# Sanity limits far above every published model (pro: 61 layers, 384 experts, vocab 129280, hidden 7168,
# 1M context); they keep a corrupt config from asking for absurd tables or allocations.
_UPPER_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_layers": 512, "num_mtp_layers": 8, "num_heads": 1024,
    "head_dim": 4096, "q_lora_rank": 1 << 16, "o_groups": 1024, "o_lora_rank": 1 << 16, "sliding_window": 1 << 20,
    "index_n_heads": 1024, "index_head_dim": 4096, "index_topk": 1 << 20, "n_routed_experts": 4096,
    "num_experts_per_tok": 256, "moe_intermediate_size": 1 << 17, "hc_mult": 64, "hc_sinkhorn_iters": 10000,
    "max_position_embeddings": 1 << 26, "yarn_original_max_position": 1 << 26,
}
_MAX_COMPRESS_RATIO = 1 << 16

def _finite(v: int | float) -> bool:
    """math.isfinite that also answers (False) for ints too large for a float."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


_LAYER_TYPE_OF = {"window": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
_KIND_OF_LAYER_TYPE = {v: k for k, v in _LAYER_TYPE_OF.items()}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture of one DeepSeek-V4 model (MODEL-SEMANTICS section 1)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_mtp_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]  # one per block, main blocks then MTP blocks
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    num_hash_layers: int
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_position: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    scale_fmt: str = "ue8m0"
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        cr = self.compress_ratios
        if not isinstance(cr, (list, tuple)) or any(isinstance(r, bool) or not isinstance(r, int) for r in cr):
            raise ConfigError(f"`compress_ratios` must be a list of integers, got {str(cr)[:80]}.",
                              "write one integer (0, 4 or the HCA ratio) per block, MTP blocks included.")
        object.__setattr__(self, "compress_ratios", tuple(cr))
        self.validate()

    # ---- derived structure -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Main blocks plus MTP blocks."""
        return self.num_layers + self.num_mtp_layers

    def attn_kind(self, block: int) -> str:
        """'window' (ratio 0), 'csa' (ratio 4, overlapping compressor + indexer) or 'hca'."""
        ratio = self.compress_ratios[block]
        if ratio == 0:
            return "window"
        return "csa" if ratio == CSA_RATIO else "hca"

    def route_kind(self, block: int) -> str:
        """'hash' for the first num_hash_layers main blocks, else 'topk' (MTP blocks route by top-k)."""
        return "hash" if block < min(self.num_hash_layers, self.num_layers) else "topk"

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def o_group_in(self) -> int:
        return self.num_heads * self.head_dim // self.o_groups

    def block_kinds(self) -> list[tuple[str, str]]:
        return [(self.attn_kind(i), self.route_kind(i)) for i in range(self.num_blocks)]

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        problems: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                problems.append(f"`{f.name}` must be an integer, got {show(v)}")
            elif f.type == "int" and not -2**63 <= v < 2**63:
                problems.append(f"`{f.name}` is out of range, got {show(v)}")
            elif f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v)):
                problems.append(f"`{f.name}` must be a finite number, got {show(v)}")
            elif f.type == "str" and not isinstance(v, str):
                problems.append(f"`{f.name}` must be a string, got {show(v)}")
        if problems:
            raise ConfigError(f"Invalid model config: {'; '.join(problems)}.", "correct these fields in config.json.")
        for name, limit in _UPPER_LIMITS.items():
            need(getattr(self, name) <= limit, f"`{name}` = {show(getattr(self, name))} exceeds dsv4c's limit of {limit}")
        need(all(r <= _MAX_COMPRESS_RATIO for r in self.compress_ratios),
             f"`compress_ratios` entries may be at most {_MAX_COMPRESS_RATIO}")
        for name in ("rms_norm_eps", "hc_eps", "routed_scaling_factor", "swiglu_limit", "yarn_factor",
                     "yarn_beta_fast", "yarn_beta_slow"):
            need(getattr(self, name) > 0, f"`{name}` must be > 0 (got {show(getattr(self, name))})")
        for name in ("rope_theta", "compress_rope_theta"):
            need(getattr(self, name) > 1, f"`{name}` must be > 1 (got {show(getattr(self, name))})")
        need(self.max_position_embeddings >= 1 and self.yarn_original_max_position >= 1,
             "`max_position_embeddings` and `rope_scaling.original_max_position_embeddings` must be >= 1")
        need(0 <= self.bos_token_id < max(self.vocab_size, 1) and 0 <= self.eos_token_id < max(self.vocab_size, 1),
             f"`bos_token_id` ({self.bos_token_id}) and `eos_token_id` ({self.eos_token_id}) must be token ids "
             f"below `vocab_size` ({self.vocab_size})")
        if problems:
            raise ConfigError(f"Invalid model config: {'; '.join(problems)}.", "correct these fields in config.json.")
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank", "o_groups",
                    "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "hc_mult",
                    "hc_sinkhorn_iters")
        for name in positive:
            need(getattr(self, name) > 0, f"`{name}` must be > 0 (got {show(getattr(self, name))})")
        need(self.num_mtp_layers >= 0, f"`num_nextn_predict_layers` must be >= 0 (got {self.num_mtp_layers})")
        need(self.n_shared_experts in (0, 1), f"`n_shared_experts` must be 0 or 1 (got {self.n_shared_experts})")
        need(0 <= self.num_hash_layers <= self.num_layers,
             f"`num_hash_layers` ({self.num_hash_layers}) must be between 0 and num_hidden_layers ({self.num_layers})")
        if problems:
            raise ConfigError(f"Invalid model config: {'; '.join(problems)}.", "correct these fields in config.json.")
        need(len(self.compress_ratios) == self.num_blocks,
             f"`compress_ratios` has {len(self.compress_ratios)} entries but num_hidden_layers + "
             f"num_nextn_predict_layers = {self.num_layers} + {self.num_mtp_layers} = {self.num_blocks}")
        bad = [r for r in self.compress_ratios if r < 0 or (r not in (0, CSA_RATIO) and r <= CSA_RATIO)]
        need(not bad, f"`compress_ratios` entries must be 0 (window), {CSA_RATIO} (CSA) or > {CSA_RATIO} (HCA); got {show(bad, 80)}")
        need(self.scoring_func in SCORING_FUNCS, f"`scoring_func` is {self.scoring_func!r}; known: {', '.join(SCORING_FUNCS)}")
        need(self.expert_dtype in EXPERT_DTYPES, f"`expert_dtype` is {self.expert_dtype!r}; known: {', '.join(EXPERT_DTYPES)}")
        need(self.scale_fmt in SCALE_FMTS, f"`quantization_config.scale_fmt` is {self.scale_fmt!r}; known: {', '.join(SCALE_FMTS)}")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds `n_routed_experts` ({self.n_routed_experts})")
        need(self.num_heads % self.o_groups == 0, f"`num_attention_heads` ({self.num_heads}) must be divisible by `o_groups` ({self.o_groups})")
        need(0 < self.rope_dim < self.head_dim and self.rope_dim % 2 == 0,
             f"`qk_rope_head_dim` ({self.rope_dim}) must be even and smaller than `head_dim` ({self.head_dim})")
        need(self.rope_dim < self.index_head_dim, f"`qk_rope_head_dim` ({self.rope_dim}) must be smaller than `index_head_dim` ({self.index_head_dim})")
        need(self.nope_dim % KV_FP8_BLOCK == 0,
             f"`head_dim` - `qk_rope_head_dim` = {self.nope_dim} must be divisible by the KV FP8 block {KV_FP8_BLOCK}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0,
             f"`index_head_dim` ({self.index_head_dim}) must be a power of two (Walsh-Hadamard transform)")
        need(self.index_head_dim % FP4_BLOCK == 0, f"`index_head_dim` ({self.index_head_dim}) must be divisible by the FP4 block {FP4_BLOCK}")
        # Reduction (K) dims of the quantized GEMMs must hold whole activation-quantization blocks.
        for name, k in (("hidden_size", self.hidden_size), ("q_lora_rank", self.q_lora_rank),
                        ("moe_intermediate_size", self.moe_intermediate_size),
                        ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank),
                        ("num_attention_heads * head_dim / o_groups", self.o_group_in)):
            need(k % ACT_QUANT_BLOCK == 0, f"`{name}` = {k} must be divisible by the quantization block {ACT_QUANT_BLOCK}")
        need(self.sliding_window >= 1, "`sliding_window` must be >= 1")
        hca = {r for r in self.compress_ratios if r > CSA_RATIO}
        need(len(hca) <= 1, f"all HCA blocks must share one compress ratio, got {sorted(hca)}")
        if problems:
            raise ConfigError(f"Invalid model config: {'; '.join(problems)}.",
                              "correct these fields in config.json (or pick a built-in variant).")

    # ---- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"A ModelSpec must be a JSON object, got {type(d).__name__}.", "rebuild the artifact with this dsv4c.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown ModelSpec fields {unknown}.", "remove them or rebuild the artifact with this dsv4c.")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"ModelSpec fields are incomplete: {e}.", "rebuild the artifact with this dsv4c.") from None

    def to_hub_config(self) -> dict[str, Any]:
        """A hub-style config.json that also carries the transformers spellings (so both readers agree)."""
        hca_rates = sorted({r for r in self.compress_ratios if r > CSA_RATIO}) or [128]
        main_ratios = self.compress_ratios[: self.num_layers]
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_ratios": list(self.compress_ratios),
            "layer_types": [_LAYER_TYPE_OF[self.attn_kind(i)] for i in range(self.num_layers)],
            "compress_rates": {"compressed_sparse_attention": CSA_RATIO, "heavily_compressed_attention": hca_rates[0]},
            "mlp_layer_types": ["hash_moe" if self.route_kind(i) == "hash" else "moe" for i in range(self.num_layers)],
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_shared_experts": self.n_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": self.scoring_func,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": self.yarn_factor,
                "original_max_position_embeddings": self.yarn_original_max_position,
                "beta_fast": self.yarn_beta_fast,
                "beta_slow": self.yarn_beta_slow,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK],
                "scale_fmt": self.scale_fmt,
            },
            "expert_dtype": self.expert_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_config(cls, path_or_dict: str | Path | dict[str, Any], name: str | None = None) -> "ModelSpec":
        """Read a hub or transformers ``config.json`` (a file, a checkpoint directory, or a dict).

        Every problem raises ``ConfigError`` naming the file, the field and the fix."""
        if isinstance(path_or_dict, dict):
            cfg, where = path_or_dict, "config"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            where = str(p)
            if not p.is_file():
                raise ConfigError(f"No config file at {p}.", "point at a checkpoint directory that holds config.json.")
            try:
                cfg = json.loads(p.read_bytes().decode("utf-8"))
            except OSError as e:
                raise ConfigError(f"{p} cannot be read ({e.strerror or e}).", "check the file's permissions.") from None
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting or numbers
                raise ConfigError(f"{p} is not valid JSON ({type(e).__name__}: {str(e)[:120]}).",
                                  "repair or re-download config.json.") from None
            if not isinstance(cfg, dict):
                raise ConfigError(f"{p} holds a JSON {type(cfg).__name__}, not an object.", "repair config.json.")
            name = name or p.parent.name
        kw = _spec_kwargs_from_config(cfg, where)
        try:
            return cls(**kw, name=name or "custom")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e.problem}", e.fix) from None


def _spec_kwargs_from_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    missing: list[str] = []

    def bad(key: str, want: str, v: Any, fix: str | None = None) -> ConfigError:
        return ConfigError(f"{where}: `{key}` must be {want}, got {show(v, 80)}.", fix or f"set `{key}` to {want}.")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
        if required:
            missing.append(key)
        return default

    def as_num(key: str, v: Any, kind: type) -> Any:
        if kind is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise bad(key, "an integer" if kind is int else "a number", v)
        if kind is float and not _finite(v):
            raise bad(key, "a finite number", v)
        return kind(v)

    def num(key: str, default: Any = None, required: bool = False, kind: type = int) -> Any:
        v = get(key, default, required)
        return None if v is None else as_num(key, v, kind)

    def sub_num(d: dict[str, Any], parent: str, key: str, default: Any, kind: type) -> Any:
        v = d.get(key)
        return default if v is None else as_num(f"{parent}.{key}", v, kind)

    def text(key: str, v: Any) -> str:
        if not isinstance(v, str):
            raise bad(key, "a string", v)
        return v

    n_layers = num("num_hidden_layers", required=True)
    n_mtp = num("num_nextn_predict_layers", 0)
    head_dim = num("head_dim", required=True)
    # Attention schedule: hub `compress_ratios` (per block incl. MTP) or transformers `layer_types`.
    ratios = get("compress_ratios")
    if ratios is None and get("layer_types") is not None:
        lt = get("layer_types")
        rates: dict[str, Any] = {"compressed_sparse_attention": CSA_RATIO, "heavily_compressed_attention": 128}
        cr = get("compress_rates")
        if cr is not None and not isinstance(cr, dict):
            raise bad("compress_rates", "an object of layer type -> ratio", cr)
        for k, v in (cr or {}).items():
            rates[k] = as_num(f"compress_rates.{k}", v, int)
        rates["sliding_attention"] = 0
        if not isinstance(lt, list) or any(not isinstance(t, str) or t not in rates for t in lt):
            raise ConfigError(f"{where}: `layer_types` must be a list of {sorted(rates)}, got {str(lt)[:80]}.",
                              "fix `layer_types` or give `compress_ratios`.")
        ratios = [rates[t] for t in lt]
        if 0 < n_mtp <= _UPPER_LIMITS["num_mtp_layers"] and len(ratios) == n_layers:
            ratios = ratios + [0] * n_mtp  # transformers configs leave MTP blocks out; they are window-only
    if ratios is None:
        missing.append("compress_ratios (or layer_types)")
    elif not isinstance(ratios, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ratios):
        raise bad("compress_ratios", "a list of integers", ratios,
                  "write one integer (0, 4 or 128) per block, MTP blocks included.")
    n_hash = num("num_hash_layers")
    mlt = get("mlp_layer_types")
    if n_hash is None and mlt is not None:
        if not isinstance(mlt, list):
            raise bad("mlp_layer_types", "a list of 'hash_moe' / 'moe'", mlt)
        n_hash = sum(1 for t in mlt if t == "hash_moe")
        if mlt[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError(f"{where}: `mlp_layer_types` must put every `hash_moe` block first, got {str(mlt)[:80]}.",
                              "list the hash_moe blocks before the moe blocks.")
    rope_dim = num("qk_rope_head_dim")
    prf = num("partial_rotary_factor", kind=float)
    if prf is not None and not 0 < prf <= 1:
        raise bad("partial_rotary_factor", "a number in (0, 1]", prf)
    if rope_dim is None and prf is not None and head_dim and 0 < head_dim <= _UPPER_LIMITS["head_dim"]:
        rope_dim = int(round(head_dim * prf))
    yarn = get("rope_scaling") or {}
    rp = get("rope_parameters")
    if not yarn and isinstance(rp, dict):
        yarn = rp.get("compress", rp) if isinstance(rp.get("compress", rp), dict) else {}
    if not isinstance(yarn, dict):
        raise bad("rope_scaling", "an object", yarn, "fix `rope_scaling`.")
    qc = get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise bad("quantization_config", "an object", qc, "fix `quantization_config`.")
    expert_dtype = get("expert_dtype") or qc.get("expert_dtype") or "fp4"
    if missing:
        raise ConfigError(f"{where} lacks required field(s): {', '.join(missing)}.",
                          "add them (see MODEL-SEMANTICS section 1) or use --variant.")
    eos = get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0] if eos else 1
    kw: dict[str, Any] = dict(
        vocab_size=num("vocab_size", required=True),
        hidden_size=num("hidden_size", required=True),
        num_layers=n_layers,
        num_mtp_layers=n_mtp,
        num_heads=num("num_attention_heads", required=True),
        head_dim=head_dim,
        rope_dim=rope_dim if rope_dim is not None else 64,
        q_lora_rank=num("q_lora_rank", required=True),
        o_groups=num("o_groups", required=True),
        o_lora_rank=num("o_lora_rank", required=True),
        sliding_window=num("sliding_window", 128),
        compress_ratios=tuple(ratios),
        index_n_heads=num("index_n_heads", 64),
        index_head_dim=num("index_head_dim", 128),
        index_topk=num("index_topk", 512),
        n_routed_experts=num("n_routed_experts", required=True),
        num_experts_per_tok=num("num_experts_per_tok", required=True),
        n_shared_experts=num("n_shared_experts", 1),
        moe_intermediate_size=num("moe_intermediate_size", required=True),
        num_hash_layers=n_hash if n_hash is not None else 3,
        scoring_func=text("scoring_func", get("scoring_func", "sqrtsoftplus")),
        routed_scaling_factor=num("routed_scaling_factor", 1.0, kind=float),
        swiglu_limit=num("swiglu_limit", 10.0, kind=float),
        hc_mult=num("hc_mult", 4),
        hc_sinkhorn_iters=num("hc_sinkhorn_iters", 20),
        hc_eps=num("hc_eps", 1e-6, kind=float),
        rms_norm_eps=num("rms_norm_eps", 1e-6, kind=float),
        rope_theta=num("rope_theta", 10000.0, kind=float),
        compress_rope_theta=num("compress_rope_theta", 160000.0, kind=float),
        yarn_factor=(sub_num(yarn, "rope_scaling", "factor", 1.0, float)
                     if yarn.get("type", yarn.get("rope_type")) == "yarn" else 1.0),
        yarn_original_max_position=sub_num(yarn, "rope_scaling", "original_max_position_embeddings", 65536, int),
        yarn_beta_fast=sub_num(yarn, "rope_scaling", "beta_fast", 32.0, float),
        yarn_beta_slow=sub_num(yarn, "rope_scaling", "beta_slow", 1.0, float),
        max_position_embeddings=num("max_position_embeddings", 1048576),
        scale_fmt=text("quantization_config.scale_fmt", qc["scale_fmt"] if qc.get("scale_fmt") is not None else "ue8m0"),
        expert_dtype=text("expert_dtype", expert_dtype),
        bos_token_id=num("bos_token_id", 0),
        eos_token_id=as_num("eos_token_id", eos, int),
    )
    return kw


def _pro() -> ModelSpec:
    return ModelSpec(
        name="pro", vocab_size=129280, hidden_size=7168, num_layers=61, num_mtp_layers=1, num_heads=128,
        head_dim=512, rope_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, sliding_window=128,
        compress_ratios=tuple([128, 128] + [4, 128] * 29 + [4, 0]), index_n_heads=64, index_head_dim=128,
        index_topk=1024, n_routed_experts=384, num_experts_per_tok=6, n_shared_experts=1,
        moe_intermediate_size=3072, num_hash_layers=3, routed_scaling_factor=2.5)


def _flash() -> ModelSpec:
    return ModelSpec(
        name="flash", vocab_size=129280, hidden_size=4096, num_layers=43, num_mtp_layers=1, num_heads=64,
        head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=tuple([0, 0] + [4, 128] * 20 + [4] + [0]), index_n_heads=64, index_head_dim=128,
        index_topk=512, n_routed_experts=256, num_experts_per_tok=6, n_shared_experts=1,
        moe_intermediate_size=2048, num_hash_layers=3, routed_scaling_factor=1.5)


def _mini() -> ModelSpec:
    # Real ratios (4 and 128) and window (128); small widths. The default demo model.
    return ModelSpec(
        name="mini", vocab_size=1024, hidden_size=256, num_layers=6, num_mtp_layers=1, num_heads=4,
        head_dim=256, rope_dim=64, q_lora_rank=256, o_groups=2, o_lora_rank=128, sliding_window=128,
        compress_ratios=(0, 4, 128, 4, 128, 4, 0), index_n_heads=4, index_head_dim=128, index_topk=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=256,
        num_hash_layers=2, routed_scaling_factor=1.5, max_position_embeddings=65536)


def _tiny() -> ModelSpec:
    # Every feature at test size: a short window (16) and HCA ratio (16) so that a few hundred tokens
    # wrap the window and complete many compressor windows.
    return ModelSpec(
        name="tiny", vocab_size=256, hidden_size=128, num_layers=4, num_mtp_layers=1, num_heads=2,
        head_dim=128, rope_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=16,
        compress_ratios=(0, 4, 16, 4, 0), index_n_heads=8, index_head_dim=128, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
        num_hash_layers=2, routed_scaling_factor=1.5, hc_sinkhorn_iters=20, max_position_embeddings=4096)


VARIANTS = {"pro": _pro, "flash": _flash, "mini": _mini, "tiny": _tiny}


def truncated(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """The first ``num_layers`` main blocks of ``spec`` (plus its MTP blocks): a benchmark slice with the
    real geometry, e.g. Flash truncated to 4 blocks."""
    if not 1 <= num_layers <= spec.num_layers:
        raise ConfigError(f"--layers {num_layers} is outside 1..{spec.num_layers} for {spec.name!r}.",
                          f"pick a number of blocks between 1 and {spec.num_layers}.")
    ratios = spec.compress_ratios[:num_layers] + spec.compress_ratios[spec.num_layers:]
    return dataclasses.replace(spec, name=f"{spec.name}-{num_layers}", num_layers=num_layers, compress_ratios=ratios,
                               num_hash_layers=min(spec.num_hash_layers, num_layers))


def get_variant(name: str) -> ModelSpec:
    """A built-in variant by name."""
    try:
        return VARIANTS[name]()
    except KeyError:
        raise ConfigError(f"Unknown variant {name!r}.", f"use one of: {', '.join(VARIANTS)}.") from None
