"""Tiny random checkpoints with real on-disk key names, built by transformers itself.

Why: tests must never download, yet they must see the tensor names a real checkpoint of
each architecture has; `save_pretrained` of a config-built model gives exactly those.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# Small but structurally complete settings shared by every architecture.
COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# Routed-expert settings shared by the MoE architectures (names differ per config class).
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
# DeepSeek-style: dense first layer, then routed + shared experts.
DEEPSEEK_MOE = dict(
    **MOE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1
)

# model_type -> (config class name, extra config kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=8)),
    "glm4": ("Glm4Config", dict(head_dim=8, pad_token_id=0)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(**MOE, num_experts=8, shared_expert_intermediate_size=24),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(**MOE, num_experts=8, head_dim=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            **DEEPSEEK_MOE,
            kv_lora_rank=8,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # Fused experts on disk: down_proj [E, intermediate, hidden], gate_up_proj [E, hidden, 2I].
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, eos_token_id=0)),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            head_dim=8,
            n_group=1,
            topk_group=1,
        ),
    ),
}


# Every source model a test builds; conftest hashes them all again when the session ends.
SOURCE_MODELS: list[Path] = []


def build_tiny(
    outdir: str | Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = "40KB",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Save a randomly initialised tiny model of `model_type` to `outdir` and return it."""
    class_name, extra = TINY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    outdir = Path(outdir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(outdir, **kwargs)
    SOURCE_MODELS.append(outdir)
    return outdir


class StubTokenizer:
    """Just what generation and KL need from a tokenizer (tiny models ship none)."""

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = None

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens)
