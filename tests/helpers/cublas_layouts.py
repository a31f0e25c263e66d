"""Matrix products in every layout the layers hand to cuBLAS: checked against a NumPy model of the call plan on the
CPU (test_cublas_plan) and against cupy.matmul on a GPU (test_gpu_graphs)."""


def layout_cases(rng, put=lambda a: a):
    """(name, a, b): operands in every layout the layers make, as views of arrays made by put(host array)."""
    r = lambda *s: put(rng.standard_normal(s))   # noqa: E731
    wide = r(9, 12)
    tokens = r(2, 16, 3 * 8)                   # attention's qkv tokens (N, L, 3C), C = 8
    heads = lambda blk, h: tokens[:, :, blk * 8:(blk + 1) * 8].reshape(2, 16, h, 8 // h).transpose(0, 2, 1, 3)  # noqa
    yield "row-major", r(5, 4), r(4, 3)
    yield "a transposed", r(4, 5).T, r(4, 3)
    yield "b transposed", r(5, 4), r(3, 4).T
    yield "both transposed", r(4, 5).T, r(3, 4).T
    yield "column slices (ld > cols)", wide[:5, 2:6], wide[1:5, 7:10]
    yield "row slice of a transpose", wide.T[3:8, :4], r(4, 2)
    yield "m = 1", r(1, 4), r(4, 3)
    yield "n = 1", r(5, 4), r(4, 1)
    yield "k = 1", r(5, 1), r(1, 3)
    yield "1 x 1 result", r(1, 4), r(4, 1)
    yield "column of a transpose", r(1, 5).T, r(1, 3)
    yield "batched", r(3, 5, 4), r(3, 4, 2)
    yield "batched, b shared", r(3, 5, 4), r(4, 2)
    yield "batched, a shared", r(5, 4), r(3, 4, 2)
    yield "batch broadcast both ways", r(2, 1, 5, 4), r(1, 3, 4, 2)
    yield "attention q k^T, one head", heads(0, 1), heads(1, 1).transpose(0, 1, 3, 2)
    yield "attention p v, one head", r(2, 1, 16, 16), heads(2, 1)
    yield "attention q k^T, two heads", heads(0, 2), heads(1, 2).transpose(0, 1, 3, 2)
    yield "attention ds^T q, two heads", r(2, 2, 16, 16).transpose(0, 1, 3, 2), heads(0, 2)
    yield "channel sums: a ones row against images", r(1, 12), r(3, 12, 4)          # channels.channel_sums
    yield "channel sums: channels-last view", r(1, 12), r(3, 4, 12).transpose(0, 2, 1)
    yield "channel sums: one long image", r(1, 40), r(1, 40, 5)                      # a conv's bias gradient
    yield "negative stride", r(5, 4)[::-1], r(4, 3)
    yield "every other row", r(10, 4)[::2], r(4, 3)
    yield "every other column", r(5, 8)[:, ::2], r(4, 3)
