"""Plain PyTorch replicas of the RAE's ViT encoder (DINOv2 with registers) and decoder.

The witnesses of tests/test_precision.py: the same op sequence as Hugging Face's
`Dinov2WithRegistersModel` (SDPA attention) and RAE's `GeneralDecoder` (ViT-MAE layers),
so torch autocast treats them as it treats upstream, and `.double()` gives the float64
truth. Built from a converted directory's arrays (the port's names and layouts), so they
do not depend on the key names of any transformers release; tests prove them equal to the
fixture's float32 outputs first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _tensor(a: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, np.float32)),
                        requires_grad=False)


class _Linear(nn.Module):
    """nn.Linear from the port's (in, out) kernel."""

    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str):
        super().__init__()
        self.weight = _tensor(arrays[f"{prefix}/kernel"].T)
        self.bias = _tensor(arrays[f"{prefix}/bias"])

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Block(nn.Module):
    """Pre-LN ViT layer: LN -> SDPA attention -> (LayerScale) -> + x; LN -> fc1 -> GELU ->
    fc2 -> (LayerScale) -> + x, as HF's Dinov2 / ViTMAE layers."""

    def __init__(self, arrays, prefix: str, heads: int, eps: float, layer_scale: bool):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.norm1_w, self.norm1_b = (_tensor(arrays[f"{prefix}/norm1/{n}"])
                                      for n in ("scale", "bias"))
        self.norm2_w, self.norm2_b = (_tensor(arrays[f"{prefix}/norm2/{n}"])
                                      for n in ("scale", "bias"))
        self.q, self.k, self.v, self.o = (_Linear(arrays, f"{prefix}/attn/{n}")
                                          for n in ("query", "key", "value", "out"))
        self.fc1, self.fc2 = _Linear(arrays, f"{prefix}/fc1"), _Linear(arrays, f"{prefix}/fc2")
        self.ls1 = _tensor(arrays[f"{prefix}/ls1"]) if layer_scale else None
        self.ls2 = _tensor(arrays[f"{prefix}/ls2"]) if layer_scale else None

    def _attention(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, x):
        d = x.shape[-1]
        a = self._attention(F.layer_norm(x, (d,), self.norm1_w, self.norm1_b, self.eps))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.fc2(F.gelu(self.fc1(F.layer_norm(x, (d,), self.norm2_w, self.norm2_b,
                                                  self.eps))))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class TorchDinov2(nn.Module):
    """(B, 3, H, W) normalised pixels -> (B, 1 + R + N, D) after the affine-free final LN."""

    def __init__(self, cfg, arrays: Mapping[str, np.ndarray]):
        super().__init__()
        enc = {k[len("encoder/"):]: v for k, v in arrays.items() if k.startswith("encoder/")}
        self.cfg = cfg
        self.patch_w = _tensor(enc["patch_kernel"].transpose(3, 2, 0, 1))  # (D, C, p, p)
        self.patch_b = _tensor(enc["patch_bias"])
        self.cls = _tensor(enc["cls_token"])
        self.registers = _tensor(enc["register_tokens"])
        self.pos = _tensor(enc["pos_embed"])
        self.layers = nn.ModuleList(
            [_Block(enc, f"layers/{i}", cfg.num_heads, cfg.layer_norm_eps, cfg.layer_scale)
             for i in range(cfg.num_layers)])

    def forward(self, pixels):
        x = F.conv2d(pixels, self.patch_w, self.patch_b, stride=self.cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)
        b, d = x.shape[0], x.shape[-1]
        x = torch.cat([self.cls.expand(b, 1, d), x], dim=1) + self.pos
        x = torch.cat([x[:, :1], self.registers.expand(b, -1, d), x[:, 1:]], dim=1)
        for layer in self.layers:
            x = layer(x)
        return F.layer_norm(x, (d,), eps=self.cfg.layer_norm_eps)


class TorchDecoder(nn.Module):
    """(B, N, in_dim) de-normalised latent tokens -> (B, N, p*p*C) normalised pixel patches."""

    def __init__(self, cfg, arrays: Mapping[str, np.ndarray]):
        super().__init__()
        dec = {k[len("decoder/"):]: v for k, v in arrays.items() if k.startswith("decoder/")}
        self.eps = cfg.layer_norm_eps
        self.embed, self.pred = _Linear(dec, "embed"), _Linear(dec, "pred")
        self.cls, self.pos = _tensor(dec["cls_token"]), _tensor(dec["pos_embed"])
        self.norm_w, self.norm_b = _tensor(dec["norm/scale"]), _tensor(dec["norm/bias"])
        self.layers = nn.ModuleList(
            [_Block(dec, f"layers/{i}", cfg.num_heads, cfg.layer_norm_eps, False)
             for i in range(cfg.num_layers)])

    def forward(self, tokens):
        x = self.embed(tokens)
        b, d = x.shape[0], x.shape[-1]
        x = torch.cat([self.cls.expand(b, 1, d), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.pred(F.layer_norm(x, (d,), self.norm_w, self.norm_b, self.eps))[:, 1:]
