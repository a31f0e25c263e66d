"""A small residual MLP denoiser for 2-D point data (the model interface of minidiff.models.base)."""

from __future__ import annotations

from minidiff.models.base import Denoiser
from minidiff.nn.layers import linear_backward, linear_forward, linear_params, named_specs, silu_backward, silu_forward
from minidiff.nn.tape import add_grads


class MLPDenoiser(Denoiser):
    """Residual MLP on points x (N, data_dim) with integer timesteps t (N,) -> prediction (N, data_dim).

    temb = time_embed.2(SiLU(time_embed.0(sinusoidal(t, temb_dim))))        (N, hidden)
    h = in_proj(x) + temb;  h = h + blocks.i(SiLU(h)) for i < num_blocks;  out = out_proj(SiLU(h))
    All layers are Linear with PyTorch's default init; out_proj starts at zero (as DDPM's output layer).
    """

    def __init__(self, data_dim=2, hidden=128, num_blocks=3, temb_dim=32, dtype="float32", seed=0, device=None):
        super().__init__(dict(data_dim=data_dim, hidden=hidden, num_blocks=num_blocks, temb_dim=temb_dim),
                         dtype, seed, device)
        self.data_dim, self.temb_dim, self.num_blocks = data_dim, temb_dim, num_blocks
        spec = {"time_embed.0": linear_params(temb_dim, hidden), "time_embed.2": linear_params(hidden, hidden),
                "in_proj": linear_params(data_dim, hidden)}
        spec.update({f"blocks.{i}": linear_params(hidden, hidden) for i in range(num_blocks)})
        spec["out_proj"] = linear_params(hidden, data_dim, zero=True)
        self.init_params([s for name, sp in spec.items() for s in named_specs(name, sp)])

    def check_input(self, x, t):
        if x.ndim != 2 or x.shape[1] != self.data_dim or getattr(t, "shape", None) != (x.shape[0],):
            raise ValueError(f"need x (N, {self.data_dim}) and host int t (N,), got {x.shape} and "
                             f"{getattr(t, 'shape', t)}")

    def _linear(self, name, x, tape):
        out, cache = linear_forward(x, self.params[f"{name}.weight"], self.params[f"{name}.bias"])
        tape.append(cache)
        return out

    def _silu(self, x, tape):
        out, cache = silu_forward(x)
        tape.append(cache)
        return out

    def forward_layers(self, x, t, tape):
        """x (N, data_dim), t host int array (N,) -> (N, data_dim)."""
        emb = self.embed_timesteps(t, self.temb_dim)
        temb = self._linear("time_embed.2", self._silu(self._linear("time_embed.0", emb, tape), tape), tape)
        h = self._linear("in_proj", x, tape)
        h += temb
        for i in range(self.num_blocks):
            h = h + self._linear(f"blocks.{i}", self._silu(h, tape), tape)
        return self._linear("out_proj", self._silu(h, tape), tape)

    def backward_layers(self, dout, tape):
        """dout (N, data_dim) -> {name: gradient} for every parameter."""
        grads = {}

        def linear(name, d):
            dx, g = linear_backward(d, tape.pop())
            add_grads(grads, name, g)
            return dx

        def silu(d):
            return silu_backward(d, tape.pop())[0]

        dh = silu(linear("out_proj", dout))
        for i in reversed(range(self.num_blocks)):
            dh = dh + silu(linear(f"blocks.{i}", dh))  # residual: the identity path plus the block
        dtemb = dh
        linear("in_proj", dh)
        linear("time_embed.0", silu(linear("time_embed.2", dtemb)))
        return grads
