"""GGUF metadata keys: the one namespace. gguf 0.19.0 on PyPI has no `deepseek4` constants, so they live here."""

from __future__ import annotations

ARCH = "deepseek4"


def _k(suffix: str) -> str:
    return f"{ARCH}.{suffix}"


class General:
    ARCHITECTURE = "general.architecture"
    NAME = "general.name"
    ALIGNMENT = "general.alignment"
    FILE_TYPE = "general.file_type"
    QUANT_VERSION = "general.quantization_version"
    SIZE_LABEL = "general.size_label"


class Model:
    CONTEXT_LENGTH = _k("context_length")
    EMBEDDING_LENGTH = _k("embedding_length")
    EMBEDDING_LENGTH_OUT = _k("embedding_length_out")
    BLOCK_COUNT = _k("block_count")
    VOCAB_SIZE = _k("vocab_size")
    HEAD_COUNT = _k("attention.head_count")
    HEAD_COUNT_KV = _k("attention.head_count_kv")
    KEY_LENGTH = _k("attention.key_length")
    VALUE_LENGTH = _k("attention.value_length")
    ROPE_DIMS = _k("rope.dimension_count")
    ROPE_FREQ_BASE = _k("rope.freq_base")
    ROPE_SCALING_TYPE = _k("rope.scaling.type")
    ROPE_SCALING_FACTOR = _k("rope.scaling.factor")
    ROPE_SCALING_ORIG_CTX = _k("rope.scaling.original_context_length")
    ROPE_YARN_BETA_FAST = _k("rope.scaling.yarn_beta_fast")
    ROPE_YARN_BETA_SLOW = _k("rope.scaling.yarn_beta_slow")
    RMS_EPS = _k("attention.layer_norm_rms_epsilon")
    Q_LORA_RANK = _k("attention.q_lora_rank")
    SLIDING_WINDOW = _k("attention.sliding_window")
    EXPERT_COUNT = _k("expert_count")
    EXPERT_USED_COUNT = _k("expert_used_count")
    EXPERT_FFN_LENGTH = _k("expert_feed_forward_length")
    EXPERT_SHARED_COUNT = _k("expert_shared_count")
    EXPERT_WEIGHTS_SCALE = _k("expert_weights_scale")
    EXPERT_WEIGHTS_NORM = _k("expert_weights_norm")
    EXPERT_GATING_FUNC = _k("expert_gating_func")
    SWIGLU_CLAMP_EXP = _k("swiglu_clamp_exp")
    SWIGLU_CLAMP_SHEXP = _k("swiglu_clamp_shexp")
    INDEXER_HEAD_COUNT = _k("attention.indexer.head_count")
    INDEXER_KEY_LENGTH = _k("attention.indexer.key_length")
    INDEXER_TOP_K = _k("attention.indexer.top_k")
    OUTPUT_GROUP_COUNT = _k("attention.output_group_count")
    OUTPUT_LORA_RANK = _k("attention.output_lora_rank")
    COMPRESS_RATIOS = _k("attention.compress_ratios")
    COMPRESS_ROPE_FREQ_BASE = _k("attention.compress_rope_freq_base")
    HC_COUNT = _k("hyper_connection.count")
    HC_SINKHORN_ITERS = _k("hyper_connection.sinkhorn_iterations")
    HC_EPS = _k("hyper_connection.epsilon")
    HASH_LAYER_COUNT = _k("hash_layer_count")
    NEXTN_PREDICT_LAYERS = _k("nextn_predict_layers")


class Tokenizer:
    MODEL = "tokenizer.ggml.model"
    PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    HF_JSON = "tokenizer.huggingface.json"
    CHAT_TEMPLATE = "tokenizer.chat_template"


class Provenance:
    """Our own keys: where the file came from and how it was made."""

    TOOL = "v4.tool_version"
    SOURCE_REPO = "v4.source.repo"
    SOURCE_REVISION = "v4.source.revision"
    RECIPE = "v4.recipe"
    SOURCE_DTYPES = "v4.source.dtypes"  # JSON: {gguf tensor name: source dtype}
    CONFIG_JSON = "v4.source.config_json"  # the source config.json, verbatim


class Quantize:
    """llama-quantize's record of the importance matrix a file was quantized with (we write the same)."""

    IMATRIX_FILE = "quantize.imatrix.file"
    IMATRIX_DATASET = "quantize.imatrix.dataset"
    IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
    IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"


class Split:
    """llama.cpp's split sets (gguf-split): every part carries these; the first part also all the metadata."""

    NO = "split.no"  # u16, 0-based
    COUNT = "split.count"  # u16
    TENSORS_COUNT = "split.tensors.count"  # i32, tensors of the whole set


# expert_gating_func values, as llama.cpp numbers them
GATING_SQRT_SOFTPLUS = 4
