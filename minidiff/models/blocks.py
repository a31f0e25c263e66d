"""The UNet's modules, channels-last (N, H, W, C): a convolution, the upsampler, the residual block and one level of
the down or up path. Each composes layer pairs of minidiff.nn: its forward pushes the caches onto the tape, its
backward pops them in reverse and writes the parameter gradients into a dict under the full parameter names."""

from __future__ import annotations

from dataclasses import dataclass, field

from minidiff.kernels.channels import add_channels, channel_sums
from minidiff.nn.conv import conv2d_nhwc_backward, conv2d_nhwc_forward
from minidiff.nn.layers import (conv2d_params, group_norm_params, linear_backward, linear_forward, linear_params,
                                named_specs, upsample2x_nhwc_backward, upsample2x_nhwc_forward)
from minidiff.nn.norm import group_norm_nhwc_backward, group_norm_nhwc_forward
from minidiff.nn.tape import add_grads


class Conv:
    """A Conv2d as a module, channels-last: parameters `name.weight` (O, C, k, k) and `name.bias` (O,)."""

    def __init__(self, name, cin, cout, k=3, stride=1, padding=1, zero=False):
        self.name, self.stride, self.padding = name, stride, padding
        self.spec = conv2d_params(cin, cout, k, zero=zero)

    def param_specs(self):
        return named_specs(self.name, self.spec)

    def forward(self, p, x, tape):
        out, cache = conv2d_nhwc_forward(x, p[f"{self.name}.weight"], p[f"{self.name}.bias"], self.stride,
                                         self.padding)
        tape.append(cache)
        return out

    def backward(self, dout, grads, tape, input_grad=True):
        dx, g = conv2d_nhwc_backward(dout, tape.pop(), input_grad)
        add_grads(grads, self.name, g)
        return dx


class Upsample(Conv):
    """Nearest 2x upsampling, then a 3x3 conv (`name.weight`, `name.bias`): (N, H, W, C) -> (N, 2H, 2W, C)."""

    def __init__(self, name, channels):
        super().__init__(name, channels, channels)

    def forward(self, p, x, tape):
        up, cache = upsample2x_nhwc_forward(x)
        tape.append(cache)
        return super().forward(p, up, tape)

    def backward(self, dout, grads, tape):
        dup = super().backward(dout, grads, tape)
        return upsample2x_nhwc_backward(dup, tape.pop())[0]


class ResBlock:
    """GN -> SiLU -> conv3x3 -> + temb_proj(temb_act) -> GN -> SiLU -> conv3x3, plus x (1x1 `skip` conv if cin != cout).

    Channels-last: x (N, H, W, cin), temb_act (N, temb_dim) = SiLU(temb) -> (N, H, W, cout).
    """

    def __init__(self, name, cin, cout, temb_dim, groups):
        self.name, self.groups, self.has_skip = name, groups, cin != cout
        self.spec = {"norm1": group_norm_params(cin), "conv1": conv2d_params(cin, cout, 3),
                     "temb_proj": linear_params(temb_dim, cout), "norm2": group_norm_params(cout),
                     "conv2": conv2d_params(cout, cout, 3)}
        if self.has_skip:
            self.spec["skip"] = conv2d_params(cin, cout, 1)

    def param_specs(self):
        return [s for layer, spec in self.spec.items() for s in named_specs(f"{self.name}.{layer}", spec)]

    def forward(self, p, x, temb_act, tape):
        n = self.name
        h, c_n1 = group_norm_nhwc_forward(x, p[f"{n}.norm1.weight"], p[f"{n}.norm1.bias"], self.groups, silu=True,
                                          cache=tape.keeps)
        h, c_c1 = conv2d_nhwc_forward(h, p[f"{n}.conv1.weight"], None, 1, 1)
        e, c_t = linear_forward(temb_act, p[f"{n}.temb_proj.weight"], p[f"{n}.temb_proj.bias"])
        add_channels(h, e + p[f"{n}.conv1.bias"])   # conv1's bias and the timestep, in one pass
        h, c_n2 = group_norm_nhwc_forward(h, p[f"{n}.norm2.weight"], p[f"{n}.norm2.bias"], self.groups, silu=True,
                                          cache=tape.keeps)
        h, c_c2 = conv2d_nhwc_forward(h, p[f"{n}.conv2.weight"], p[f"{n}.conv2.bias"], 1, 1)
        c_skip = None
        if self.has_skip:
            s, c_skip = conv2d_nhwc_forward(x, p[f"{n}.skip.weight"], p[f"{n}.skip.bias"])
            h += s
        else:
            h += x
        tape.append((c_n1, c_c1, c_t, c_n2, c_c2, c_skip))
        return h

    def backward(self, dout, grads, tape):
        """dout (N, H, W, cout) -> (dx (N, H, W, cin), dtemb_act (N, temb_dim)); parameter gradients into `grads`."""
        c_n1, c_c1, c_t, c_n2, c_c2, c_skip = tape.pop()
        n = self.name
        dh, g = conv2d_nhwc_backward(dout, c_c2)
        add_grads(grads, f"{n}.conv2", g)
        dh, g = group_norm_nhwc_backward(dh, c_n2)
        add_grads(grads, f"{n}.norm2", g)
        N, H, W, C = dh.shape
        de = channel_sums(dh.reshape(N, H * W, C))           # temb and conv1's bias were broadcast over H, W
        dtemb, g = linear_backward(de, c_t)
        add_grads(grads, f"{n}.temb_proj", g)
        dh, g = conv2d_nhwc_backward(dh, c_c1)
        add_grads(grads, f"{n}.conv1", {**g, "bias": de.sum(axis=0)})
        dx, g = group_norm_nhwc_backward(dh, c_n1)
        add_grads(grads, f"{n}.norm1", g)
        if self.has_skip:
            dskip, g = conv2d_nhwc_backward(dout, c_skip)
            add_grads(grads, f"{n}.skip", g)
            dx += dskip
        else:
            dx += dout
        return dx, dtemb


@dataclass
class Level:
    """One resolution of the down or up path: ResBlocks, their AttnBlocks (None where absent), and a resampler."""
    res: list = field(default_factory=list)
    attn: list = field(default_factory=list)
    resample: Conv | None = None

    def param_specs(self):
        mods = self.res + [a for a in self.attn if a is not None] + ([self.resample] if self.resample else [])
        return [s for m in mods for s in m.param_specs()]
