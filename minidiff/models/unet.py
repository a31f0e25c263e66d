"""The DDPM UNet (Ho et al. 2020, appendix B), forward and hand-derived backward.

Timestep t -> sinusoidal(base) -> Linear -> SiLU -> Linear (4*base) = temb; every ResBlock adds Linear(SiLU(temb)).
Down path: conv_in, then per level `num_res_blocks` ResBlocks (each followed by an AttnBlock at `attention_levels`)
and a stride-2 3x3 conv except at the last level; every output on the way down is kept as a skip. Middle: ResBlock,
AttnBlock (`mid_attention`), ResBlock. Up path: per level `num_res_blocks + 1` ResBlocks, each on the channel
concatenation of the running features and one skip (last in, first out), nearest 2x + 3x3 conv between levels.
Output: GroupNorm -> SiLU -> 3x3 conv, initialised to zero as in DDPM.

The modules compute channels-last, (N, H, W, C): the UNet transposes its NCHW input and output once, at its edges,
and every GroupNorm -> SiLU pair is one fused layer (`minidiff.nn.norm`). Parameters keep PyTorch's names and layouts.
Images never meet (no batch statistics), so a wrapper may run chunks of a batch side by side and sum their gradients
(minidiff.execution.data_parallel).
"""

from __future__ import annotations

from minidiff.models.base import Denoiser
from minidiff.models.blocks import Conv, Level, ResBlock, Upsample
from minidiff.nn.attention import AttnBlock
from minidiff.nn.conv import conv2d_nhwc_backward, conv2d_nhwc_forward
from minidiff.nn.layers import (concat_backward, concat_forward, conv2d_params, group_norm_params, linear_backward,
                                linear_forward, linear_params, named_specs, silu_backward, silu_forward)
from minidiff.nn.norm import group_norm_nhwc_backward, group_norm_nhwc_forward
from minidiff.nn.tape import add_grads


class UNet(Denoiser):
    """DDPM UNet on (N, in_channels, H, W); H and W divisible by 2 ** (len(channel_mults) - 1). See the module doc.

    The defaults are a small model for 8x8 digits (177k parameters; the model of docs/momentum-study.md); use
    channel_mults=(1, 2, 2) and more for 16x16 or 32x32 images. `groups` must divide base_channels * every mult,
    and should stay below it: with one channel per group, GroupNorm removes every per-channel constant, including
    the timestep a ResBlock adds.
    """

    images_independent = True

    def __init__(self, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), groups=8, num_heads=1, mid_attention=True, dtype="float32", seed=0,
                 device=None):
        channel_mults, attention_levels = tuple(channel_mults), tuple(attention_levels)
        super().__init__(dict(in_channels=in_channels, base_channels=base_channels, channel_mults=list(channel_mults),
                              num_res_blocks=num_res_blocks, attention_levels=list(attention_levels), groups=groups,
                              num_heads=num_heads, mid_attention=mid_attention), dtype, seed, device)
        if any(base_channels * m % groups for m in channel_mults):
            raise ValueError(f"groups={groups} must divide every level's channels "
                             f"{[base_channels * m for m in channel_mults]}")
        if any(not 0 <= i < len(channel_mults) for i in attention_levels):
            raise ValueError(f"attention_levels {attention_levels} must index channel_mults {channel_mults}")
        self.in_channels, self.base_channels, self.num_levels = in_channels, base_channels, len(channel_mults)
        self._build(channel_mults, num_res_blocks, set(attention_levels), groups, num_heads, mid_attention)
        self.init_params(self._param_specs())

    def _build(self, mults, nrb, attn_levels, groups, heads, mid_attention):
        base, temb_dim = self.base_channels, 4 * self.base_channels
        self.time_spec = {"time_embed.0": linear_params(base, temb_dim),
                          "time_embed.2": linear_params(temb_dim, temb_dim)}
        self.conv_in = Conv("conv_in", self.in_channels, base)
        ch, skips, self.down = base, [base], []
        for i, mult in enumerate(mults):
            lvl = Level()
            for j in range(nrb):
                lvl.res.append(ResBlock(f"down.{i}.res.{j}", ch, base * mult, temb_dim, groups))
                ch = base * mult
                lvl.attn.append(AttnBlock(f"down.{i}.attn.{j}", ch, groups, heads) if i in attn_levels else None)
                skips.append(ch)
            if i != len(mults) - 1:
                lvl.resample = Conv(f"down.{i}.downsample", ch, ch, stride=2)
                skips.append(ch)
            self.down.append(lvl)
        self.mid = [ResBlock("mid.res1", ch, ch, temb_dim, groups),
                    AttnBlock("mid.attn", ch, groups, heads) if mid_attention else None,
                    ResBlock("mid.res2", ch, ch, temb_dim, groups)]
        self.up = [None] * len(mults)
        for i in reversed(range(len(mults))):
            lvl = Level()
            for j in range(nrb + 1):
                lvl.res.append(ResBlock(f"up.{i}.res.{j}", ch + skips.pop(), base * mults[i], temb_dim, groups))
                ch = base * mults[i]
                lvl.attn.append(AttnBlock(f"up.{i}.attn.{j}", ch, groups, heads) if i in attn_levels else None)
            if i != 0:
                lvl.resample = Upsample(f"up.{i}.upsample", ch)
            self.up[i] = lvl
        self.out_groups, self.out_spec = groups, {"out_norm": group_norm_params(ch),
                                                  "out_conv": conv2d_params(ch, self.in_channels, 3, zero=True)}

    def _param_specs(self):
        """All parameters in registration order (the order of the PyTorch twin's state_dict)."""
        specs = [s for name, spec in self.time_spec.items() for s in named_specs(name, spec)]
        specs += self.conv_in.param_specs()
        specs += [s for lvl in self.down for s in lvl.param_specs()]
        specs += [s for m in self.mid if m is not None for s in m.param_specs()]
        specs += [s for lvl in self.up for s in lvl.param_specs()]
        return specs + [s for name, spec in self.out_spec.items() for s in named_specs(name, spec)]

    def forward_layers(self, x, t, tape):
        """x (N, in_channels, H, W), t host int array (N,) -> prediction (N, in_channels, H, W)."""
        xp, p = self.backend.xp, self.params
        temb_act = self._time_forward(t, tape)
        hs = [self.conv_in.forward(p, xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), tape)]   # channels-last
        for lvl in self.down:
            for res, attn in zip(lvl.res, lvl.attn):
                h = res.forward(p, hs[-1], temb_act, tape)
                hs.append(attn.forward(p, h, tape) if attn else h)
            if lvl.resample:
                hs.append(lvl.resample.forward(p, hs[-1], tape))
        res1, attn, res2 = self.mid
        h = res1.forward(p, hs[-1], temb_act, tape)
        h = attn.forward(p, h, tape) if attn else h
        h = res2.forward(p, h, temb_act, tape)
        for lvl in reversed(self.up):
            for res, attn in zip(lvl.res, lvl.attn):
                h, c = concat_forward(h, hs.pop(), axis=-1)
                tape.append(c)
                h = res.forward(p, h, temb_act, tape)
                h = attn.forward(p, h, tape) if attn else h
            if lvl.resample:
                h = lvl.resample.forward(p, h, tape)
        return xp.ascontiguousarray(self._out_forward(h, tape).transpose(0, 3, 1, 2))

    def backward_layers(self, dout, tape):
        """dout (N, in_channels, H, W) = dLoss/dprediction -> {name: dLoss/dparam} for every parameter."""
        grads, xp = {}, self.backend.xp
        dtemb = 0.0
        dh = self._out_backward(xp.ascontiguousarray(dout.transpose(0, 2, 3, 1)), grads, tape)   # channels-last
        dskips = []  # filled in the order the skips were made on the way down
        for lvl in self.up:
            if lvl.resample:
                dh = lvl.resample.backward(dh, grads, tape)
            for res, attn in reversed(list(zip(lvl.res, lvl.attn))):
                dh = attn.backward(dh, grads, tape) if attn else dh
                dh, dt = res.backward(dh, grads, tape)
                dtemb = dtemb + dt
                (dh, dskip), _ = concat_backward(dh, tape.pop())
                dh = xp.ascontiguousarray(dh)  # a channel slice: made contiguous once, not in every consumer
                dskips.append(dskip)
        res1, attn, res2 = self.mid
        dh, dt = res2.backward(dh, grads, tape)
        dh = attn.backward(dh, grads, tape) if attn else dh
        dh, dt1 = res1.backward(dh, grads, tape)
        dtemb = dtemb + dt + dt1
        for lvl in reversed(self.down):
            if lvl.resample:
                dh = lvl.resample.backward(dh + dskips.pop(), grads, tape)
            for res, attn in reversed(list(zip(lvl.res, lvl.attn))):
                dh = dh + dskips.pop()  # a down-path output feeds the next layer and one skip
                dh = attn.backward(dh, grads, tape) if attn else dh
                dh, dt = res.backward(dh, grads, tape)
                dtemb = dtemb + dt
        self.conv_in.backward(dh + dskips.pop(), grads, tape, input_grad=False)   # the image needs no gradient
        self._time_backward(dtemb, grads, tape)
        return grads

    def check_input(self, x, t):
        f = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) with H, W divisible by {f}, got {x.shape}")
        if getattr(t, "shape", None) != (x.shape[0],):
            raise ValueError(f"t must be a host int array of shape ({x.shape[0]},), got {getattr(t, 'shape', t)}")

    def _time_forward(self, t, tape):
        """t -> SiLU(temb), (N, 4*base): the input of every ResBlock's temb_proj."""
        p = self.params
        emb = self.embed_timesteps(t, self.base_channels)
        h, c0 = linear_forward(emb, p["time_embed.0.weight"], p["time_embed.0.bias"])
        h, c1 = silu_forward(h)
        h, c2 = linear_forward(h, p["time_embed.2.weight"], p["time_embed.2.bias"])
        h, c3 = silu_forward(h)
        tape.append((c0, c1, c2, c3))
        return h

    def _time_backward(self, dtemb_act, grads, tape):
        c0, c1, c2, c3 = tape.pop()
        dh, _ = silu_backward(dtemb_act, c3)
        dh, g = linear_backward(dh, c2)
        add_grads(grads, "time_embed.2", g)
        dh, _ = silu_backward(dh, c1)
        _, g = linear_backward(dh, c0)
        add_grads(grads, "time_embed.0", g)

    def _out_forward(self, h, tape):
        p = self.params
        h, c0 = group_norm_nhwc_forward(h, p["out_norm.weight"], p["out_norm.bias"], self.out_groups, silu=True,
                                        cache=tape.keeps)
        h, c1 = conv2d_nhwc_forward(h, p["out_conv.weight"], p["out_conv.bias"], 1, 1)
        tape.append((c0, c1))
        return h

    def _out_backward(self, dout, grads, tape):
        c0, c1 = tape.pop()
        dh, g = conv2d_nhwc_backward(dout, c1)
        add_grads(grads, "out_conv", g)
        dh, g = group_norm_nhwc_backward(dh, c0)
        add_grads(grads, "out_norm", g)
        return dh
