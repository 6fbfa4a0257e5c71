"""ModelArgs: the DeepSeek-V4 hyper-parameters, read from config.json or from GGUF metadata.

This is the bridge by which configuration travels with the weights: the converter writes exactly these fields
into GGUF keys (quant/keys.py), and the engine reads them back. Nothing is inferred from file names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf import GGUFValueType

from quant import keys as K
from quant.errors import CheckpointError, GGUFError, UnsupportedModel

SUPPORTED_ARCHS = ("DeepseekV4ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("deepseek_v4",)


@dataclass(frozen=True)
class ModelArgs:
    """Every field is required: Flash's values are written once, in FLASH_CONFIG, and a checkpoint or GGUF that
    lacks one is an error naming the key rather than silently Flash's."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    num_hash_layers: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    swiglu_limit: float
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    rope_original_max_position: int
    beta_fast: float
    beta_slow: float
    max_position_embeddings: int
    num_nextn_predict_layers: int
    # one entry per layer, then the MTP layer(s): 0 = sliding window only, 4 = CSA, other = HCA ratio
    compress_ratios: tuple[int, ...]
    bos_token_id: int
    eos_token_id: int

    # ---- derived facts the model and the planners share ----
    def layer_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_csa(self, layer: int) -> bool:
        return self.compress_ratios[layer] == 4

    def is_hca(self, layer: int) -> bool:
        return self.compress_ratios[layer] not in (0, 4)

    def is_hash(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArgs:
        """From an official config.json dict. Raises UnsupportedModel for other architectures and CheckpointError,
        naming the key, for a key it lacks or a value of the wrong type or out of range."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"config.json holds a JSON {type(cfg).__name__}, not an object",
                                  hint="the checkpoint is damaged: download it again with v4 pull")
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHS):
            raise UnsupportedModel(
                f"unsupported architecture {archs or cfg.get('model_type')!r}: v4 runs DeepSeek-V4 checkpoints only",
                hint="point at a DeepSeek-V4 checkpoint (v4 pull flash)",
            )
        if cfg.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
            raise UnsupportedModel(f"unsupported scoring_func {cfg.get('scoring_func')!r}")
        missing = [f for f in cls.__dataclass_fields__ if f not in cfg and f not in _ROPE_FIELDS
                   and f not in _OPTIONAL_CONFIG]
        rs = cfg.get("rope_scaling", {})
        if not isinstance(rs, dict):
            raise CheckpointError(f"config.json: rope_scaling must be an object, is {_show(rs)}", hint=_HINT_CONFIG)
        missing += [f"rope_scaling.{key}" for key in _ROPE_SCALING if key not in rs]
        if missing:
            raise CheckpointError(f"config.json: missing {', '.join(missing)}", hint=_HINT_CONFIG)
        kw = {f: _checked(f, cfg.get(f, _OPTIONAL_CONFIG.get(f))) for f in cls.__dataclass_fields__
              if f != "compress_ratios" and f not in _ROPE_FIELDS}
        for key, field_name in _ROPE_SCALING.items():
            kw[field_name] = _checked(field_name, rs[key], f"rope_scaling.{key}")
        n, ratios = kw["num_hidden_layers"], cfg["compress_ratios"]
        valid = isinstance(ratios, (list, tuple)) and all(_is_int(r) and (r == 0 or 4 <= r <= _MAX_U32) for r in ratios)
        if not valid:
            raise CheckpointError(f"config.json: compress_ratios must be a list of ratios (0 = window only, 4 = CSA, "
                                  f">4 = HCA), is {_show(ratios)}", hint=_HINT_CONFIG)
        if len(ratios) < n:
            raise CheckpointError(f"config.json: compress_ratios has {len(ratios)} entries, need ≥ {n}",
                                  hint=_HINT_CONFIG)
        kw["compress_ratios"] = tuple(ratios)
        for key in ("bos_token_id", "eos_token_id"):
            if kw[key] >= kw["vocab_size"]:
                raise CheckpointError(f"config.json: {key} = {kw[key]} is not below vocab_size", hint=_HINT_CONFIG)
        return cls(**kw)

    @classmethod
    def from_config_file(cls, path: Path) -> ModelArgs:
        return cls.from_config(read_config(path))

    def gguf_kv(self, with_mtp: bool = False) -> list[tuple[str, object, GGUFValueType]]:
        """(key, value, type) triples for the `deepseek4` GGUF header, strict types as llama.cpp reads them."""
        U, F, B, S = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
        A = GGUFValueType.ARRAY
        n_blocks = self.num_hidden_layers + (self.num_nextn_predict_layers if with_mtp else 0)
        kv: list[tuple[str, object, GGUFValueType]] = [
            (K.Model.CONTEXT_LENGTH, self.max_position_embeddings, U),
            (K.Model.EMBEDDING_LENGTH, self.hidden_size, U),
            (K.Model.EMBEDDING_LENGTH_OUT, self.hidden_size * self.hc_mult, U),
            (K.Model.BLOCK_COUNT, n_blocks, U),
            (K.Model.VOCAB_SIZE, self.vocab_size, U),
            (K.Model.HEAD_COUNT, self.num_attention_heads, U),
            (K.Model.HEAD_COUNT_KV, self.num_key_value_heads, U),
            (K.Model.KEY_LENGTH, self.head_dim, U),
            (K.Model.VALUE_LENGTH, self.head_dim, U),
            (K.Model.ROPE_DIMS, self.qk_rope_head_dim, U),
            (K.Model.ROPE_FREQ_BASE, self.rope_theta, F),
            (K.Model.ROPE_SCALING_TYPE, "yarn", S),
            (K.Model.ROPE_SCALING_FACTOR, self.rope_factor, F),
            (K.Model.ROPE_SCALING_ORIG_CTX, self.rope_original_max_position, U),
            (K.Model.ROPE_YARN_BETA_FAST, self.beta_fast, F),
            (K.Model.ROPE_YARN_BETA_SLOW, self.beta_slow, F),
            (K.Model.RMS_EPS, self.rms_norm_eps, F),
            (K.Model.Q_LORA_RANK, self.q_lora_rank, U),
            (K.Model.SLIDING_WINDOW, self.sliding_window, U),
            (K.Model.EXPERT_COUNT, self.n_routed_experts, U),
            (K.Model.EXPERT_USED_COUNT, self.num_experts_per_tok, U),
            (K.Model.EXPERT_FFN_LENGTH, self.moe_intermediate_size, U),
            (K.Model.EXPERT_SHARED_COUNT, self.n_shared_experts, U),
            (K.Model.EXPERT_WEIGHTS_SCALE, self.routed_scaling_factor, F),
            (K.Model.EXPERT_WEIGHTS_NORM, self.norm_topk_prob, B),
            (K.Model.EXPERT_GATING_FUNC, K.GATING_SQRT_SOFTPLUS, U),
            (K.Model.SWIGLU_CLAMP_EXP, [float(self.swiglu_limit)] * n_blocks, A),
            (K.Model.SWIGLU_CLAMP_SHEXP, [float(self.swiglu_limit)] * n_blocks, A),
            (K.Model.INDEXER_HEAD_COUNT, self.index_n_heads, U),
            (K.Model.INDEXER_KEY_LENGTH, self.index_head_dim, U),
            (K.Model.INDEXER_TOP_K, self.index_topk, U),
            (K.Model.OUTPUT_GROUP_COUNT, self.o_groups, U),
            (K.Model.OUTPUT_LORA_RANK, self.o_lora_rank, U),
            (K.Model.COMPRESS_RATIOS, [int(r) for r in self.compress_ratios], A),
            (K.Model.COMPRESS_ROPE_FREQ_BASE, self.compress_rope_theta, F),
            (K.Model.HC_COUNT, self.hc_mult, U),
            (K.Model.HC_SINKHORN_ITERS, self.hc_sinkhorn_iters, U),
            (K.Model.HC_EPS, self.hc_eps, F),
            (K.Model.HASH_LAYER_COUNT, self.num_hash_layers, U),
        ]
        if with_mtp:
            kv.append((K.Model.NEXTN_PREDICT_LAYERS, self.num_nextn_predict_layers, U))
        return kv

    @classmethod
    def from_gguf(cls, md: dict) -> ModelArgs:
        """From GGUF metadata (key → python value). Raises UnsupportedModel for other architectures and GGUFError
        naming the keys it lacks."""
        arch = md.get(K.General.ARCHITECTURE)
        if arch != K.ARCH:
            raise UnsupportedModel(f"GGUF architecture is {arch!r}, not {K.ARCH!r}", hint="use a DeepSeek-V4 GGUF")
        M = K.Model
        # llama.cpp's converter writes no vocab_size: the token list's length is the vocabulary
        vocab = md.get(M.VOCAB_SIZE) or len(md.get(K.Tokenizer.TOKENS) or [])
        missing = [key for key in GGUF_REQUIRED_KEYS if key not in md] + ([] if vocab else [M.VOCAB_SIZE])
        if missing:
            raise GGUFError(f"GGUF metadata: missing {', '.join(missing)}", hint=_HINT_GGUF)
        n_nextn = int(md.get(M.NEXTN_PREDICT_LAYERS, 0))  # written only beside an MTP block
        # a GGUF may carry no tokenizer; every V4 shares one, which numbers these as Flash's config does
        bos = int(md.get(K.Tokenizer.BOS_ID, FLASH_CONFIG["bos_token_id"]))
        eos = int(md.get(K.Tokenizer.EOS_ID, FLASH_CONFIG["eos_token_id"]))
        clamp = md[M.SWIGLU_CLAMP_EXP]
        return cls(
            **{f: cast(md[key]) for f, (key, cast) in _GGUF_FIELDS.items()},
            vocab_size=int(vocab),
            num_hidden_layers=int(md[M.BLOCK_COUNT]) - n_nextn,
            num_nextn_predict_layers=n_nextn,
            swiglu_limit=float(clamp[0] if isinstance(clamp, (list, tuple)) else clamp),
            compress_ratios=tuple(int(r) for r in md[M.COMPRESS_RATIOS]),
            bos_token_id=bos,
            eos_token_id=eos,
        )

    def to_dict(self) -> dict:
        return asdict(self)


_HINT_CONFIG = "the checkpoint's config.json is damaged or not DeepSeek-V4's: download it again with v4 pull"
_HINT_GGUF = "the file was written by an incompatible converter: convert it again with v4 quantize"
# the one key the official config format may leave out: without it the checkpoint has no MTP block (llama.cpp's
# converter reads it the same way)
_OPTIONAL_CONFIG = {"num_nextn_predict_layers": 0}
_MAX_U32 = (1 << 32) - 1  # the GGUF header stores these as u32
# counts the converter and planners loop over: far above any V4 (Flash: 43 layers, 256 experts) yet small enough
# that a hostile config cannot make `v4 quantize --dry-run` spin for hours before saying anything
_MAX_COUNT = 1 << 16
_COUNTS = ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "num_hash_layers",
           "num_nextn_predict_layers", "hc_mult", "hc_sinkhorn_iters", "o_groups", "num_attention_heads",
           "num_key_value_heads", "index_n_heads")
# may be 0: no hash-routed layers, no shared expert, no MTP block, token ids
_MAY_BE_ZERO = ("num_hash_layers", "n_shared_experts", "num_nextn_predict_layers", "bos_token_id", "eos_token_id")
# rope_scaling's keys → the ModelArgs fields they set
_ROPE_SCALING = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_position",
                 "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
_ROPE_FIELDS = frozenset(_ROPE_SCALING.values())

_M = K.Model
# ModelArgs field → (GGUF key, cast) for the fields read one key each; the rest are built in from_gguf
_GGUF_FIELDS = {
    "hidden_size": (_M.EMBEDDING_LENGTH, int), "num_attention_heads": (_M.HEAD_COUNT, int),
    "num_key_value_heads": (_M.HEAD_COUNT_KV, int), "head_dim": (_M.KEY_LENGTH, int),
    "qk_rope_head_dim": (_M.ROPE_DIMS, int), "q_lora_rank": (_M.Q_LORA_RANK, int),
    "o_groups": (_M.OUTPUT_GROUP_COUNT, int), "o_lora_rank": (_M.OUTPUT_LORA_RANK, int),
    "moe_intermediate_size": (_M.EXPERT_FFN_LENGTH, int), "n_routed_experts": (_M.EXPERT_COUNT, int),
    "n_shared_experts": (_M.EXPERT_SHARED_COUNT, int), "num_experts_per_tok": (_M.EXPERT_USED_COUNT, int),
    "num_hash_layers": (_M.HASH_LAYER_COUNT, int), "routed_scaling_factor": (_M.EXPERT_WEIGHTS_SCALE, float),
    "norm_topk_prob": (_M.EXPERT_WEIGHTS_NORM, bool), "sliding_window": (_M.SLIDING_WINDOW, int),
    "index_n_heads": (_M.INDEXER_HEAD_COUNT, int), "index_head_dim": (_M.INDEXER_KEY_LENGTH, int),
    "index_topk": (_M.INDEXER_TOP_K, int), "hc_mult": (_M.HC_COUNT, int),
    "hc_sinkhorn_iters": (_M.HC_SINKHORN_ITERS, int), "hc_eps": (_M.HC_EPS, float),
    "rms_norm_eps": (_M.RMS_EPS, float), "rope_theta": (_M.ROPE_FREQ_BASE, float),
    "compress_rope_theta": (_M.COMPRESS_ROPE_FREQ_BASE, float), "rope_factor": (_M.ROPE_SCALING_FACTOR, float),
    "rope_original_max_position": (_M.ROPE_SCALING_ORIG_CTX, int), "beta_fast": (_M.ROPE_YARN_BETA_FAST, float),
    "beta_slow": (_M.ROPE_YARN_BETA_SLOW, float), "max_position_embeddings": (_M.CONTEXT_LENGTH, int),
}
# every key ModelArgs.from_gguf needs (vocab_size may come from the token list instead)
GGUF_REQUIRED_KEYS = (*(key for key, _ in _GGUF_FIELDS.values()), _M.BLOCK_COUNT, _M.SWIGLU_CLAMP_EXP,
                      _M.COMPRESS_RATIOS)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _show(v: object) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_KINDS = {"int": int, "float": float, "bool": bool}  # the annotations, as strings under `from __future__`


def _checked(field_name: str, value: object, key: str | None = None) -> object:
    """`value` for ModelArgs.`field_name` if it has the field's type and range; CheckpointError naming `key`."""
    key = key or field_name
    kind = _KINDS[ModelArgs.__dataclass_fields__[field_name].type]
    if kind is bool:
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind is int:
        low = 0 if field_name in _MAY_BE_ZERO else 1
        high = _MAX_COUNT if field_name in _COUNTS else _MAX_U32
        ok = _is_int(value) and low <= value <= high
        want = f"an integer from {low} to {high:,}"
    else:  # float: JSON writes 10000 as an integer; NaN and infinities are not a hyper-parameter
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and value >= 0
        want = "a finite number ≥ 0"
        value = float(value) if ok else value
    if not ok:
        raise CheckpointError(f"config.json: {key} must be {want}, is {_show(value)}", hint=_HINT_CONFIG)
    return value


def read_config(path: Path) -> dict:
    """A checkpoint's config.json, checked (see ModelArgs.from_config); CheckpointError in one line otherwise."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found",
                              hint="is this a model folder? try v4 pull flash") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})", hint=_HINT_CONFIG) from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror})", hint="check its permissions") from None
    try:
        ModelArgs.from_config(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path.parent}/{e}", hint=e.hint) from None
    return cfg


# The real DeepSeek-V4-Flash config (facts §2): the schedule 0,0 then alternating CSA 4 / HCA 128, MTP layer SWA.
FLASH_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
    "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128]},
    "expert_dtype": "fp4",
    "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
    "torch_dtype": "bfloat16",
}
