"""Padding-free varlen attention for packed training batches, without the flash-attn package.

TRL's padding-free collator flattens a batch of packed examples into one row with restarting
``position_ids`` and passes ``cu_seq_lens_q/k`` + ``max_length_q/k``. With ``sdpa`` transformers
turns that into a dense block-diagonal 4D mask (seq x seq per batch), which rules out the
flash kernel. PyTorch (>= 2.10) ships ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention
on CUDA, causal, GQA), so we register it as an attention implementation for transformers:
``attn_implementation="llmpipe_varlen"``. Examples never attend to each other: each one is its
own causal segment given by ``cu_seq_lens``.

Falls back to sdpa for calls that carry a padding mask or no sequence boundaries (eval with
padding, generation).
"""

from __future__ import annotations

NAME = "llmpipe_varlen"
_registered = False
# Resolved once by register(): imports and signature inspection stay out of the traced code when
# the decoder layers run under torch.compile (train.compile).
_varlen_attn = None
_sdpa_forward = None


def available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: q/k/v are (B, H, S, D); returns (B, S, H, D), None."""
    import torch

    varlen_attn, sdpa_attention_forward = _varlen_attn, _sdpa_forward   # set by register()
    cu = kwargs.get("cu_seq_lens_q")
    if attention_mask is not None and cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, s, d = query.shape
    hk = key.shape[1]
    if cu is None:  # unpacked, unpadded batch: every row is one sequence
        cu = torch.arange(0, (b + 1) * s, s, device=query.device, dtype=torch.int32)
        max_len = s
    else:
        cu = cu.to(device=query.device, dtype=torch.int32)
        max_len = int(kwargs.get("max_length_q") or s)
    if hk != h and not _causal_kwargs(True).get("enable_gqa"):
        # Expand grouped KV heads explicitly: older varlen_attn has no GQA switch.
        key = key.repeat_interleave(h // hk, dim=1)
        value = value.repeat_interleave(h // hk, dim=1)
        hk = h
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **_causal_kwargs(hk != h))
    return out.reshape(b, s, h, d), None


_KW_CACHE: dict[bool, dict] = {}


def _causal_kwargs(gqa: bool) -> dict:
    """Keyword arguments for a causal (GQA) call; the signature differs across torch versions."""
    if gqa not in _KW_CACHE:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw: dict = {}
        if "is_causal" in params:            # torch 2.10 / 2.11
            kw["is_causal"] = True
        elif "window_size" in params:        # later: (-1, 0) = causal
            kw["window_size"] = (-1, 0)
        else:
            raise RuntimeError("torch.nn.attention.varlen.varlen_attn: cannot request causal attention")
        if gqa and "enable_gqa" in params:   # the flash kernel handles fewer KV heads natively
            kw["enable_gqa"] = True
        _KW_CACHE[gqa] = kw
    return _KW_CACHE[gqa]


def _resolve() -> None:
    global _varlen_attn, _sdpa_forward
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _causal_kwargs(True)
    _causal_kwargs(False)
    _varlen_attn, _sdpa_forward = varlen_attn, sdpa_attention_forward


def register() -> str:
    """Register ``llmpipe_varlen`` with transformers (idempotent); return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

        _resolve()
        AttentionInterface.register(NAME, varlen_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
        _registered = True
    return NAME
