"""Probe torch's varlen_attn against per-segment causal SDPA (CUDA). Prints relative errors."""
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

print(inspect.signature(varlen_attn))
torch.manual_seed(0)
lens, H, HK, D = [300, 700, 128, 920], 8, 2, 64
T = sum(lens)
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(T, HK, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(T, HK, D, device="cuda", dtype=torch.bfloat16)
cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def ref(causal, kk, vv):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)[None]
        ks = kk[a:b].transpose(0, 1)[None].repeat_interleave(H // kk.shape[1], 1)
        vs = vv[a:b].transpose(0, 1)[None].repeat_interleave(H // vv.shape[1], 1)
        outs.append(F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=causal)[0].transpose(0, 1))
    return torch.cat(outs)


for name, kk, vv in [("gqa_native", k, v), ("repeat", k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1))]:
    for ws in [(-1, 0), (-1, -1)]:
        try:
            out = varlen_attn(q, kk, vv, cu, cu, max(lens), max(lens), window_size=ws).float()
            for causal in (True, False):
                r = ref(causal, k, v)
                print(name, ws, "vs causal" if causal else "vs full", f"{float((out - r).norm() / r.norm()):.2e}")
        except Exception as e:
            print(name, ws, "ERROR", type(e).__name__, str(e)[:200])
