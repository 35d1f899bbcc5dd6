"""The memory-aware "auto" rule (llmpipe.train.memory): a pure function of the numbers, tested
without a GPU. The GPU facts it must reproduce (issue 16, H200, Llama-3.1-8B shape, 4 x 2048
tokens per optimizer step): checkpointing off = 15.1k tokens/s at 76.2 GB, checkpointing +
offloading = 10.9k tokens/s at 19.5 GB, QLoRA with checkpointing = 11.0 GB."""

from __future__ import annotations

import pytest

from llmpipe.train.memory import GB, ModelShape, estimate_peak_bytes, plan_memory

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
H200_FREE = 149e9          # torch.cuda.mem_get_info on a lent H200 (139 GiB) before loading
CARD_80GB = 80e9


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return ModelShape.from_config(LLAMA_8B)


def test_parameter_count_of_the_8b_shape(llama8b):
    assert llama8b.num_parameters == 8_030_261_248        # Llama-3.1-8B
    assert llama8b.lora_parameters(16) == 41_943_040      # r=16 on all 7 linear layers x 32


@pytest.mark.parametrize("ckpt, offload, quantized, dropout, measured_gb", [
    (False, False, False, True, 76.2),    # stage_lora_nockpt
    (True, True, False, False, 19.5),     # stage_lora_mb4_d0_offload
    (True, False, True, True, 11.0),      # stage_qlora
])
def test_estimate_is_on_the_safe_side_of_the_h200_measurements(llama8b, ckpt, offload, quantized, dropout,
                                                                measured_gb):
    est = estimate_peak_bytes(llama8b, tokens=4 * 2048, gradient_checkpointing=ckpt, activation_offloading=offload,
                              bytes_per_element=2, quantized=quantized, lora_r=16, lora_dropout=dropout) / GB
    assert 0.99 * measured_gb <= est <= 1.25 * measured_gb, est


def test_h200_gets_the_fastest_setting_no_checkpointing(llama8b):
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=H200_FREE)
    assert (p.gradient_checkpointing, p.activation_offloading, p.micro_batch_size) == (False, False, 4)
    assert p.gradient_accumulation_steps == 1 and not p.notes
    assert p.estimate_gb <= p.budget_gb and "no checkpointing" in p.reason


def test_80gb_card_keeps_checkpointing_off_with_two_rows_per_forward(llama8b):
    """76 GB measured for 4 rows does not fit an 80 GB card with headroom; 2 rows x 2 accumulation
    steps keeps the recomputation-free step (same tokens per optimizer step)."""
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=CARD_80GB)
    assert (p.gradient_checkpointing, p.activation_offloading, p.micro_batch_size) == (False, False, 2)
    assert p.gradient_accumulation_steps == 2 and p.estimate_gb <= p.budget_gb < 80


def test_smaller_cards_fall_back_in_order(llama8b):
    picks = []
    for free_gb in (149, 80, 48, 30, 24, 22, 16):
        p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=free_gb * GB)
        picks.append((p.gradient_checkpointing, p.activation_offloading, p.micro_batch_size))
        assert p.micro_batch_size * p.gradient_accumulation_steps == 4      # tokens per step unchanged
        if not p.notes:
            assert p.estimate_gb <= p.budget_gb
    assert picks == [(False, False, 4), (False, False, 2), (False, False, 1), (True, False, 4), (True, False, 2),
                     (True, True, 1), (True, True, 1)]
    # 16 GB: even the leanest plan is over budget: picked anyway, with a note saying so
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=16 * GB)
    assert p.notes and "may run out of memory" in p.notes[0] and p.estimate_gb > p.budget_gb


def test_settings_that_are_not_auto_are_kept(llama8b):
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=H200_FREE, gradient_checkpointing=True)
    assert p.gradient_checkpointing is True and p.activation_offloading is False and p.micro_batch_size == 4
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=H200_FREE, micro_batch_size=1)
    assert (p.gradient_checkpointing, p.micro_batch_size, p.gradient_accumulation_steps) == (False, 1, 4)
    p = plan_memory(llama8b, seq_len=2048, rows_per_step=4, free_bytes=24 * GB, activation_offloading=True)
    assert p.gradient_checkpointing is True and p.activation_offloading is True and p.micro_batch_size == 4


def test_without_a_gpu_nothing_is_recomputed_or_split(llama8b):
    p = plan_memory(llama8b, seq_len=512, rows_per_step=2, free_bytes=None)
    assert (p.gradient_checkpointing, p.activation_offloading, p.micro_batch_size) == (False, False, 2)
    assert p.budget_gb is None and p.reason.startswith("no GPU")


def test_resolve_runtime_records_the_pick_for_metrics():
    from llmpipe.config import load_params
    from llmpipe.train.config import resolve_runtime

    params = load_params()
    tp = type(params.train)(**{**params.train.model_dump(), "per_device_batch_size": 4, "quantization": "none",
                               "precision": "bf16", "compile": False, "attn_implementation": "sdpa"})
    shape = ModelShape.from_config(LLAMA_8B)
    rt = resolve_runtime(tp, params.lora, seq_len=2048, shape=shape, cuda=True, free_bytes=CARD_80GB)
    assert (rt.gradient_checkpointing, rt.micro_batch_size, rt.gradient_accumulation_steps) == (False, 2, 2)
    assert rt.picked["micro_batch_size"] == 2 and rt.picked["budget_gb"] == 70.5
    assert rt.to_dict()["picked"] == rt.picked


def test_model_shape_is_read_from_config_and_safetensors_headers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.train.memory import read_model_shape

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    shape = read_model_shape(tmp_path)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    assert shape.num_parameters == ModelShape.from_config(cfg.to_dict()).num_parameters
    assert (shape.hidden_size, shape.num_layers, shape.num_kv_heads, shape.tied_embeddings) == (64, 2, 2, True)
