"""The shapes of common hub checkpoints of today's families, pinned so ``llavatune plan --model HUB_ID`` works offline.

The values are the published ``config.json`` fields the planner reads (everything else is transformers' default for the
model type); ``tests/test_plan.py`` builds each on the meta device and checks the planner's parameter counts against
the real modules. When the hub (or the local cache) can serve a model's own config.json, ``plan`` reads that instead.
"""

from __future__ import annotations

import copy

_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "vision_use_head": False}
_QWEN25_VIT = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31]}
_QWEN2_VIT = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}


def _qwen_text(hidden, inter, layers, heads, kv, vocab, tie, head_dim=None):
    out = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie}
    if head_dim:
        out["head_dim"] = head_dim
    return out


def _qwen2_vl(hidden, inter, layers, heads, kv, vocab, tie):
    return {"model_type": "qwen2_vl", "tie_word_embeddings": tie,
            "text_config": _qwen_text(hidden, inter, layers, heads, kv, vocab, tie),
            "vision_config": {**_QWEN2_VIT, "hidden_size": hidden}}


def _qwen2_5_vl(hidden, inter, layers, heads, kv, vocab, tie):
    return {"model_type": "qwen2_5_vl", "tie_word_embeddings": tie,
            "text_config": _qwen_text(hidden, inter, layers, heads, kv, vocab, tie),
            "vision_config": {**_QWEN25_VIT, "out_hidden_size": hidden}}


def _qwen3_vl(hidden, inter, layers, heads, kv, tie, vit):
    return {"model_type": "qwen3_vl", "tie_word_embeddings": tie,
            "text_config": _qwen_text(hidden, inter, layers, heads, kv, 151936, tie, head_dim=128),
            "vision_config": {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 16,
                              "num_position_embeddings": 2304, "out_hidden_size": hidden, **vit}}


def _gemma3(hidden, inter, layers, heads, kv, head_dim):
    return {"model_type": "gemma3", "mm_tokens_per_image": 256,
            "text_config": {"model_type": "gemma3_text", "hidden_size": hidden, "intermediate_size": inter,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                            "head_dim": head_dim, "vocab_size": 262208},
            "vision_config": {**_SIGLIP_SO400M, "image_size": 896}}


HUB_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2-VL-2B-Instruct": _qwen2_vl(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2-VL-7B-Instruct": _qwen2_vl(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen2_5_vl(8192, 29568, 80, 64, 8, 152064, False),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen3_vl(2560, 9728, 36, 32, 8, True, {"depth": 24, "hidden_size": 1024,
                                                                          "intermediate_size": 4096,
                                                                          "deepstack_visual_indexes": [5, 11, 17]}),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen3_vl(4096, 12288, 36, 32, 8, False, {"depth": 27, "hidden_size": 1152,
                                                                            "intermediate_size": 4304,
                                                                            "deepstack_visual_indexes": [8, 16, 24]}),
    "google/gemma-3-4b-it": _gemma3(2560, 10240, 34, 8, 4, 256),
    "google/gemma-3-12b-it": _gemma3(3840, 15360, 48, 16, 8, 256),
    "google/gemma-3-27b-it": _gemma3(5376, 21504, 62, 32, 16, 128),
    "HuggingFaceTB/SmolVLM-256M-Instruct": {
        "model_type": "smolvlm", "scale_factor": 4, "tie_word_embeddings": False,
        "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                        "tie_word_embeddings": False},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 512, "patch_size": 16}},
    "google/paligemma2-3b-pt-224": {
        "model_type": "paligemma", "projection_dim": 2304, "hidden_size": 2304,
        "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 257216},
        "vision_config": {**_SIGLIP_SO400M, "image_size": 224, "projection_dim": 2304}},
}


def hub_config(ref: str) -> dict | None:
    """A copy of the pinned config of hub id ``ref`` (None when it is not in the table)."""
    cfg = HUB_CONFIGS.get(ref)
    return copy.deepcopy(cfg) if cfg is not None else None
