"""The shapes of the hub models llavatune's recipes and docs name, and each family's common sizes, shipped.

"Does it fit?" comes before any download: ``plan --model llava-hf/llava-1.5-7b-hf`` (or ``Qwen/Qwen2.5-VL-7B-Instruct``,
...) answers from this table, offline, without asking the hub; only other hub ids are fetched (their config.json).

Each entry holds the values of the model's published ``config.json`` that its parameter count and memory depend on
(hidden sizes, layers, heads, vocabulary, vision tower geometry, tied embeddings), laid out as transformers 5 reads
them; ``transformers.AutoConfig.for_model`` fills in the rest with the library's defaults, which are the published
values for the keys left out. ``tests/test_plan.py`` builds every entry with transformers' own classes on the meta
device and checks its parameter count against the count published on the model's page.
"""

from __future__ import annotations

import copy
from typing import Any

_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}
_LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32}
_NEXT_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14}


def _llava(text: dict, **top: Any) -> dict:
    return {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "text_config": text, "vision_config": _CLIP_L_336, **top}


def _next(text: dict) -> dict:
    return {**_llava(text), "model_type": "llava_next", "image_grid_pinpoints": _NEXT_GRID}


def _qwen_vl(model_type: str, hidden, intermediate, layers, heads, kv, vocab, tied, vision: dict, **text) -> dict:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL config: the language model's shapes and the vision tower's."""
    return {"model_type": model_type,
            "text_config": {"model_type": f"{model_type}_text", "hidden_size": hidden, "intermediate_size": intermediate,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                            "vocab_size": vocab, "tie_word_embeddings": tied, **text},
            "vision_config": {"model_type": model_type, "spatial_merge_size": 2, "temporal_patch_size": 2, **vision},
            "tie_word_embeddings": tied}


def _qwen2_vl(hidden, intermediate, layers, heads, kv, vocab, tied) -> dict:
    return _qwen_vl("qwen2_vl", hidden, intermediate, layers, heads, kv, vocab, tied,
                    {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": hidden,
                     "patch_size": 14})


def _qwen2_5_vl(hidden, intermediate, layers, heads, kv, vocab, tied) -> dict:
    return _qwen_vl("qwen2_5_vl", hidden, intermediate, layers, heads, kv, vocab, tied,
                    {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                     "out_hidden_size": hidden, "patch_size": 14, "window_size": 112,
                     "fullatt_block_indexes": [7, 15, 23, 31]})


def _qwen3_vl(hidden, intermediate, layers, tied, vision) -> dict:
    return _qwen_vl("qwen3_vl", hidden, intermediate, layers, 32 if hidden > 2048 else 16, 8, 151936, tied,
                    {"num_heads": 16, "out_hidden_size": hidden, "patch_size": 16, "num_position_embeddings": 2304,
                     **vision}, head_dim=128)


_QWEN3_VL_SMALL_VISION = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "deepstack_visual_indexes": [5, 11, 17]}
_QWEN3_VL_LARGE_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "deepstack_visual_indexes": [8, 16, 24]}


def _gemma3(hidden, intermediate, layers, heads, kv, head_dim=256) -> dict:
    return {"model_type": "gemma3", "mm_tokens_per_image": 256, "image_token_index": 262144,
            "text_config": {"model_type": "gemma3_text", "hidden_size": hidden, "intermediate_size": intermediate,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                            "head_dim": head_dim, "vocab_size": 262208},
            "vision_config": {**_SIGLIP_SO400M, "image_size": 896, "vision_use_head": False}}


def _smolvlm(text: dict, vision: dict, scale: int) -> dict:
    return {"model_type": "idefics3", "scale_factor": scale,
            "text_config": {"model_type": "llama", **text},
            "vision_config": {"model_type": "idefics3_vision", **vision}}


_SMOL_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "image_size": 512, "patch_size": 16}


def _internvl3(hidden, intermediate, layers, heads, kv, tied) -> dict:
    return {"model_type": "internvl", "downsample_ratio": 0.5, "vision_feature_layer": -1,
            "text_config": {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": intermediate,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                            "vocab_size": 151674, "tie_word_embeddings": tied},
            "vision_config": {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096,
                              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": [448, 448],
                              "patch_size": [14, 14]},
            "tie_word_embeddings": tied}


HUB_CONFIGS: dict[str, dict[str, Any]] = {
    # LLaVA-1.5 and LLaVA-NeXT (llava-hf)
    "llava-hf/llava-1.5-7b-hf": _llava({"model_type": "llama", "vocab_size": 32064, **_LLAMA_7B}),
    "llava-hf/llava-1.5-13b-hf": _llava({"model_type": "llama", "vocab_size": 32064, "hidden_size": 5120,
                                         "intermediate_size": 13824, "num_hidden_layers": 40,
                                         "num_attention_heads": 40, "num_key_value_heads": 40}),
    "llava-hf/llava-v1.6-mistral-7b-hf": _next({"model_type": "mistral", "vocab_size": 32064, "hidden_size": 4096,
                                                "intermediate_size": 14336, "num_hidden_layers": 32,
                                                "num_attention_heads": 32, "num_key_value_heads": 8}),
    "llava-hf/llava-v1.6-vicuna-7b-hf": _next({"model_type": "llama", "vocab_size": 32064, **_LLAMA_7B}),
    # the two halves `train --model compose` joins in configs/pretrain_vicuna7b_clip336.yaml
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip", "vision_config": _CLIP_L_336, "projection_dim": 768,
        "text_config": {"model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "projection_dim": 768}},
    "lmsys/vicuna-7b-v1.5": {"model_type": "llama", "vocab_size": 32000, **_LLAMA_7B},
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "Qwen/Qwen2-VL-2B-Instruct": _qwen2_vl(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2-VL-7B-Instruct": _qwen2_vl(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen2_5_vl(8192, 29568, 80, 64, 8, 152064, False),
    "Qwen/Qwen3-VL-2B-Instruct": _qwen3_vl(2048, 6144, 28, True, _QWEN3_VL_SMALL_VISION),
    "Qwen/Qwen3-VL-4B-Instruct": _qwen3_vl(2560, 9728, 36, True, _QWEN3_VL_SMALL_VISION),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen3_vl(4096, 12288, 36, False, _QWEN3_VL_LARGE_VISION),
    # Gemma 3, PaliGemma
    "google/gemma-3-4b-it": _gemma3(2560, 10240, 34, 8, 4),
    "google/gemma-3-12b-it": _gemma3(3840, 15360, 48, 16, 8),
    "google/gemma-3-27b-it": _gemma3(5376, 21504, 62, 32, 16, head_dim=128),
    "google/paligemma-3b-pt-224": {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                        "vocab_size": 257216},
        "vision_config": {**_SIGLIP_SO400M, "image_size": 224, "projection_dim": 2048, "vision_use_head": False}},
    "google/paligemma2-3b-pt-224": {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2304,
        "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "vocab_size": 257216},
        "vision_config": {**_SIGLIP_SO400M, "image_size": 224, "projection_dim": 2304, "vision_use_head": False}},
    # Idefics3 and SmolVLM (SmolVLM v1 checkpoints are the Idefics3 architecture)
    "HuggingFaceM4/Idefics3-8B-Llama3": _smolvlm(
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128259},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
         "image_size": 364, "patch_size": 14}, 2),
    "HuggingFaceTB/SmolVLM-256M-Instruct": _smolvlm(
        {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 49280}, _SMOL_VISION, 4),
    "HuggingFaceTB/SmolVLM-500M-Instruct": _smolvlm(
        {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
         "num_key_value_heads": 5, "vocab_size": 49280}, _SMOL_VISION, 4),
    "HuggingFaceTB/SmolVLM-Instruct": _smolvlm(
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 49155},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
         "image_size": 384, "patch_size": 14}, 3),
    # InternVL3 (the -hf conversions transformers loads natively)
    "OpenGVLab/InternVL3-1B-hf": _internvl3(896, 4864, 24, 14, 2, False),
    "OpenGVLab/InternVL3-2B-hf": _internvl3(1536, 8960, 28, 12, 2, False),
    "OpenGVLab/InternVL3-8B-hf": _internvl3(3584, 18944, 28, 28, 4, False),
    # Mistral Small 3.1 (Pixtral vision), Llama 3.2 Vision
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": {
        "model_type": "mistral3", "spatial_merge_size": 2, "multimodal_projector_bias": False,
        "vision_feature_layer": -1, "tie_word_embeddings": False,
        "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768,
                        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "vocab_size": 131072},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64, "image_size": 1540,
                          "patch_size": 14}},
    "meta-llama/Llama-3.2-11B-Vision-Instruct": {
        "model_type": "mllama",
        "text_config": {"model_type": "mllama_text_model", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "vocab_size": 128256, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]},
        "vision_config": {"model_type": "mllama_vision_model", "hidden_size": 1280, "intermediate_size": 5120,
                          "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16, "image_size": 560,
                          "patch_size": 14, "max_num_tiles": 4, "vision_output_dim": 7680,
                          "intermediate_layers_indices": [3, 7, 15, 23, 30]}},
}

# The parameter count each model's hub page publishes (safetensors metadata), for the test that builds them.
PUBLISHED_PARAMS: dict[str, float] = {
    "llava-hf/llava-1.5-7b-hf": 7.06e9,
    "llava-hf/llava-1.5-13b-hf": 13.35e9,
    "llava-hf/llava-v1.6-mistral-7b-hf": 7.57e9,
    "llava-hf/llava-v1.6-vicuna-7b-hf": 7.06e9,
    "openai/clip-vit-large-patch14-336": 428e6,
    "lmsys/vicuna-7b-v1.5": 6.74e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen2.5-VL-72B-Instruct": 73.4e9,
    "Qwen/Qwen3-VL-2B-Instruct": 2.13e9,
    "Qwen/Qwen3-VL-4B-Instruct": 4.44e9,
    "Qwen/Qwen3-VL-8B-Instruct": 8.77e9,
    "google/gemma-3-4b-it": 4.3e9,
    "google/gemma-3-12b-it": 12.2e9,
    "google/gemma-3-27b-it": 27.4e9,
    "google/paligemma-3b-pt-224": 2.92e9,
    "google/paligemma2-3b-pt-224": 3.03e9,
    "HuggingFaceM4/Idefics3-8B-Llama3": 8.46e9,
    "HuggingFaceTB/SmolVLM-256M-Instruct": 256e6,
    "HuggingFaceTB/SmolVLM-500M-Instruct": 507e6,
    "HuggingFaceTB/SmolVLM-Instruct": 2.25e9,
    "OpenGVLab/InternVL3-1B-hf": 0.94e9,
    "OpenGVLab/InternVL3-2B-hf": 2.09e9,
    "OpenGVLab/InternVL3-8B-hf": 7.94e9,
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": 24.0e9,
    "meta-llama/Llama-3.2-11B-Vision-Instruct": 10.7e9,
}


def hub_config(ref: str) -> dict[str, Any] | None:
    """The shipped config values of hub id ``ref`` (a copy), or None when the table does not know it."""
    cfg = HUB_CONFIGS.get(ref)
    return copy.deepcopy(cfg) if cfg is not None else None
