"""ModelArgs has no defaults: Flash is FLASH_CONFIG, and a config.json or GGUF without a key names it."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from quant import keys as K
from quant.config import FLASH_CONFIG, GGUF_REQUIRED_KEYS, ModelArgs
from quant.errors import CheckpointError, GGUFError


def _flash_metadata() -> dict:
    args = ModelArgs.from_config(FLASH_CONFIG)
    md = {key: value for key, value, _ in args.gguf_kv(with_mtp=True)}
    md[K.General.ARCHITECTURE] = K.ARCH
    return md


def test_every_field_is_required():
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(ModelArgs))
    with pytest.raises(TypeError):
        ModelArgs()


def test_flash_from_flash_config_is_the_official_model():
    a = ModelArgs.from_config(FLASH_CONFIG)
    assert (a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.head_dim) == (
        129280, 4096, 43, 64, 512)
    assert (a.n_routed_experts, a.num_experts_per_tok, a.n_shared_experts, a.moe_intermediate_size) == (256, 6, 1, 2048)
    assert (a.q_lora_rank, a.o_groups, a.o_lora_rank, a.sliding_window, a.index_topk) == (1024, 8, 1024, 128, 512)
    assert (a.rope_factor, a.rope_original_max_position, a.max_position_embeddings) == (16.0, 65536, 1048576)
    assert a.compress_ratios[:4] == (0, 0, 4, 128) and len(a.compress_ratios) == 44 and a.compress_ratios[-1] == 0
    assert a.num_nextn_predict_layers == 1 and (a.bos_token_id, a.eos_token_id) == (0, 1)


def test_flash_round_trips_through_gguf_metadata():
    assert ModelArgs.from_gguf(_flash_metadata()) == ModelArgs.from_config(FLASH_CONFIG)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "compress_ratios", "bos_token_id", "norm_topk_prob"])
def test_config_missing_a_key_names_it(key):
    cfg = copy.deepcopy(FLASH_CONFIG)
    del cfg[key]
    with pytest.raises(CheckpointError, match=rf"^config.json: missing {key}$") as e:
        ModelArgs.from_config(cfg)
    assert "v4 pull" in e.value.hint


def test_config_missing_a_rope_scaling_key_names_it():
    cfg = copy.deepcopy(FLASH_CONFIG)
    del cfg["rope_scaling"]["beta_fast"]
    with pytest.raises(CheckpointError, match="missing rope_scaling.beta_fast"):
        ModelArgs.from_config(cfg)


def test_config_without_mtp_key_has_no_mtp_block():
    cfg = copy.deepcopy(FLASH_CONFIG)
    del cfg["num_nextn_predict_layers"]
    assert ModelArgs.from_config(cfg).num_nextn_predict_layers == 0


@pytest.mark.parametrize("key", GGUF_REQUIRED_KEYS)
def test_gguf_missing_a_key_names_it(key):
    md = _flash_metadata()
    del md[key]
    with pytest.raises(GGUFError, match=f"missing {key}") as e:
        ModelArgs.from_gguf(md)
    assert "v4 quantize" in e.value.hint


def test_gguf_vocab_size_falls_back_to_the_token_list():
    md = _flash_metadata()
    del md[K.Model.VOCAB_SIZE]
    with pytest.raises(GGUFError, match=f"missing {K.Model.VOCAB_SIZE}"):
        ModelArgs.from_gguf(md)
    md[K.Tokenizer.TOKENS] = ["t"] * 129280
    assert ModelArgs.from_gguf(md).vocab_size == 129280
