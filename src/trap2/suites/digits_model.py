"""The `digits` suite's backbone: a 3-block pre-LN ViT over 4×4 patches of 8×8 digit images.

Linear layers are plain ``nn.Linear`` named ``q, k, v, o, fc1, fc2`` so PEFT can target them by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DigitsViTConfig:
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_dim: int = 128
    patch: int = 4
    image: int = 8

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (
            m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: DigitsViTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DigitsViT(nn.Module):
    """(B, 8, 8) images in [0, 1] -> (B, dim) features (the final-norm CLS token)."""

    def __init__(self, cfg: DigitsViTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DigitsViTConfig()
        c = self.cfg
        n_patches = (c.image // c.patch) ** 2
        self.patch_embed = nn.Linear(c.patch * c.patch, c.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, g = self.cfg.patch, self.cfg.image // self.cfg.patch
        # (B, 8, 8) -> (B, g, p, g, p) -> (B, g*g, p*p)
        patches = x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.ln_f(h[:, 0])
