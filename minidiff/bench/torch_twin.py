"""PyTorch twins of UNet and MLPDenoiser: the same architecture, parameter names and layouts, built from torch.nn.

The twin is an independent second implementation (torch layers, torch autograd) used as the reference in the tests
and as the PyTorch eager baseline in the benchmark. torch is imported inside functions only: the package never
needs it. Usage:

    twin = torch_twin(model)              # an nn.Module with model's weights, in model's dtype
    y = twin(torch_x, torch_t)            # torch_t: int64 tensor (N,)
    copy_params_to_twin(model, twin)      # after changing model.params
"""

from __future__ import annotations

import functools
import math

from minidiff.backend import to_numpy


def _embedding(torch, t, dim, dtype):
    """DDPM's sinusoidal embedding, computed in float64 like the model's (so float32 twins see the same numbers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float64, device=t.device))
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


@functools.lru_cache(maxsize=None)
def _classes():
    """Define the nn.Module classes once, on first use (torch is imported here, not at package import)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, temb_dim, groups):
            super().__init__()
            self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
            self.temb_proj = nn.Linear(temb_dim, cout)
            self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, temb):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(F.silu(self.norm2(h)))
            return h + (self.skip(x) if self.skip is not None else x)

    class AttnBlock(nn.Module):
        def __init__(self, channels, groups, num_heads):
            super().__init__()
            self.heads = num_heads
            self.norm, self.qkv = nn.GroupNorm(groups, channels), nn.Conv2d(channels, 3 * channels, 1)
            self.proj = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            n, c, hgt, wid = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
            w = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c // self.heads), dim=-1)   # (n, heads, L, L)
            return x + self.proj((v @ w.transpose(-1, -2)).reshape(n, c, hgt, wid))

    class UNet(nn.Module):
        def __init__(self, in_channels, base_channels, channel_mults, num_res_blocks, attention_levels, groups,
                     num_heads, mid_attention, **_):
            super().__init__()
            base, tdim, nlev = base_channels, 4 * base_channels, len(channel_mults)
            self.base, self.nrb = base, num_res_blocks
            self.time_embed = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
            self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
            ch, skips, self.down = base, [base], nn.ModuleList()
            for i, mult in enumerate(channel_mults):
                lvl = nn.Module()
                lvl.res, lvl.attn = nn.ModuleList(), nn.ModuleList()
                for _ in range(num_res_blocks):
                    lvl.res.append(ResBlock(ch, base * mult, tdim, groups))
                    ch = base * mult
                    if i in attention_levels:
                        lvl.attn.append(AttnBlock(ch, groups, num_heads))
                    skips.append(ch)
                if i != nlev - 1:
                    lvl.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                    skips.append(ch)
                self.down.append(lvl)
            self.mid = nn.Module()
            self.mid.res1 = ResBlock(ch, ch, tdim, groups)
            self.mid.attn = AttnBlock(ch, groups, num_heads) if mid_attention else None
            self.mid.res2 = ResBlock(ch, ch, tdim, groups)
            ups = [None] * nlev
            for i in reversed(range(nlev)):
                lvl = nn.Module()
                lvl.res, lvl.attn = nn.ModuleList(), nn.ModuleList()
                for _ in range(num_res_blocks + 1):
                    lvl.res.append(ResBlock(ch + skips.pop(), base * channel_mults[i], tdim, groups))
                    ch = base * channel_mults[i]
                    if i in attention_levels:
                        lvl.attn.append(AttnBlock(ch, groups, num_heads))
                if i != 0:
                    lvl.upsample = nn.Conv2d(ch, ch, 3, padding=1)
                ups[i] = lvl
            self.up = nn.ModuleList(ups)
            self.out_norm, self.out_conv = nn.GroupNorm(groups, ch), nn.Conv2d(ch, in_channels, 3, padding=1)

        def forward(self, x, t):
            temb = self.time_embed(_embedding(torch, t, self.base, x.dtype))
            hs = [self.conv_in(x)]
            for lvl in self.down:
                for j, res in enumerate(lvl.res):
                    h = res(hs[-1], temb)
                    hs.append(lvl.attn[j](h) if len(lvl.attn) else h)
                if hasattr(lvl, "downsample"):
                    hs.append(lvl.downsample(hs[-1]))
            h = self.mid.res1(hs[-1], temb)
            h = self.mid.attn(h) if self.mid.attn is not None else h
            h = self.mid.res2(h, temb)
            for lvl in reversed(self.up):
                for j, res in enumerate(lvl.res):
                    h = res(torch.cat([h, hs.pop()], dim=1), temb)
                    h = lvl.attn[j](h) if len(lvl.attn) else h
                if hasattr(lvl, "upsample"):
                    h = lvl.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
            return self.out_conv(F.silu(self.out_norm(h)))

    class MLPDenoiser(nn.Module):
        def __init__(self, data_dim, hidden, num_blocks, temb_dim, **_):
            super().__init__()
            self.temb_dim = temb_dim
            self.time_embed = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.in_proj = nn.Linear(data_dim, hidden)
            self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
            self.out_proj = nn.Linear(hidden, data_dim)

        def forward(self, x, t):
            h = self.in_proj(x) + self.time_embed(_embedding(torch, t, self.temb_dim, x.dtype))
            for block in self.blocks:
                h = h + block(F.silu(h))
            return self.out_proj(F.silu(h))

    return {"UNet": UNet, "MLPDenoiser": MLPDenoiser}


def torch_twin(model, device="cpu"):
    """A torch.nn.Module twin of a minidiff UNet or MLPDenoiser, holding a copy of its weights in its dtype."""
    import torch

    cls = _classes()[type(model).__name__]
    torch.manual_seed(model.config["seed"])  # the twin's own init is overwritten below; this keeps it quiet and fixed
    twin = cls(**model.config).to(device=device, dtype=getattr(torch, model.dtype.name))
    copy_params_to_twin(model, twin)
    return twin


def copy_params_to_twin(model, twin):
    """Copy model.params into the twin's parameters (names and shapes must match exactly)."""
    import torch

    state = twin.state_dict()
    if list(state) != list(model.params):
        raise KeyError(f"parameter names differ: twin-only {sorted(set(state) - set(model.params))}, "
                       f"model-only {sorted(set(model.params) - set(state))}")
    with torch.no_grad():
        for name, value in model.params.items():
            state[name].copy_(torch.from_numpy(to_numpy(value)))
