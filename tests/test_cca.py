"""Criss-cross attention against a NumPy float64 loop written from the paper's definition."""

import jittor as jt
import numpy as np
import pytest

from ccnet import ops
from ccnet.models.cca import CrissCrossAttention
from ccnet.ops.cca import criss_cross_affinity, criss_cross_attention_plain


def reference_cca(q, k, v, softmax="pixel"):
    """Loop over pixels: scores over the column (centre excluded) and the row, one softmax, weighted sum.
    softmax="whole" (the seed's Jittor nn.Softmax() without a dim): one normaliser over every score of the batch."""
    b_, _, h, w = q.shape
    out = np.zeros(v.shape, np.float64)
    scores = {}
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                col = [i for i in range(h) if i != y]
                scores[b, y, x] = np.array(
                    [q[b, :, y, x] @ k[b, :, i, x] for i in col] + [q[b, :, y, x] @ k[b, :, y, j] for j in range(w)]
                )
    top = max(s.max() for s in scores.values())
    total = sum(np.exp(s - top).sum() for s in scores.values())  # over the whole tensor
    for (b, y, x), s in scores.items():
        values = [v[b, :, i, x] for i in range(h) if i != y] + [v[b, :, y, j] for j in range(w)]
        if softmax == "whole":
            weights = np.exp(s - top) / total
        else:
            weights = np.exp(s - s.max())
            weights /= weights.sum()
        out[b, :, y, x] = weights @ np.array(values)
    return out


def random_qkv(seed, b, cq, c, h, w):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, cq, h, w)),
        rng.standard_normal((b, cq, h, w)),
        rng.standard_normal((b, c, h, w)),
    )


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 4), (2, 3, 5, 5, 7), (3, 4, 2, 6, 3), (1, 8, 16, 9, 11)])
def test_matches_float64_loop(shape):
    q, k, v = random_qkv(sum(shape), *shape)
    out = criss_cross_attention_plain(*(jt.array(a.astype(np.float32)) for a in (q, k, v))).numpy()
    ref = reference_cca(q, k, v)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 5), (2, 3, 4, 5, 3)])
def test_whole_tensor_softmax_matches_float64_loop(shape):
    """model.cca_softmax=whole: one softmax over the whole (B, H, W, H + W) tensor, as the seed's Jittor code."""
    q, k, v = random_qkv(sum(shape), *shape)
    q, k = 3 * q, 3 * k  # large scores: a per-pixel normaliser would differ a lot
    out = criss_cross_attention_plain(*(jt.array(a.astype(np.float32)) for a in (q, k, v)), softmax="whole").numpy()
    ref = reference_cca(q, k, v, softmax="whole")
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    assert np.abs(out - reference_cca(q, k, v)).max() / np.abs(ref).max() > 1e-2  # not the per-pixel op
    att = criss_cross_affinity(jt.array(q.astype(np.float32)), jt.array(k.astype(np.float32)), "whole").numpy()
    assert abs(att.sum() - 1.0) < 1e-5 and np.all(att[0, 0, :, 0] == 0)  # sums to 1 overall; the centre stays out


def test_whole_softmax_module_runs_plain_ops_under_the_fused_kernel_setting(caplog):
    """kernels.cca=fused has no whole-tensor softmax: the module falls back to the plain ops and says so."""
    import logging

    rng = np.random.default_rng(1)
    x = jt.array(rng.standard_normal((1, 16, 5, 7)).astype(np.float32))
    module = CrissCrossAttention(16, softmax="whole")
    module.gamma.update(jt.ones(1))
    q, k, v = (conv(x).numpy().astype(np.float64) for conv in (module.query_conv, module.key_conv, module.value_conv))
    from ccnet.ops import cca

    cca._whole_softmax_is_plain.cache_clear()  # said once per process
    with ops.using(cca="fused"), caplog.at_level(logging.INFO):
        out = module(x).numpy()
    ref = reference_cca(q, k, v, softmax="whole") + x.numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    assert [r.message for r in caplog.records if "cca_softmax=whole" in r.message], caplog.text


def test_attention_weights_sum_to_one_and_skip_the_centre():
    q, k, _ = random_qkv(0, 2, 3, 1, 5, 6)
    att = criss_cross_affinity(jt.array(q.astype(np.float32)), jt.array(k.astype(np.float32))).numpy()
    assert att.shape == (2, 5, 6, 5 + 6)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)
    for y in range(5):  # column weight at i == y is exactly zero: the centre counts once, in the row
        assert np.all(att[:, y, :, y] == 0)


def test_gradients_match_finite_differences():
    q, k, v = random_qkv(3, 1, 2, 3, 4, 5)
    proj = np.random.default_rng(9).standard_normal((1, 3, 4, 5))  # a random linear read-out of the output
    jq, jk, jv = (jt.array(a.astype(np.float32)) for a in (q, k, v))
    loss = (criss_cross_attention_plain(jq, jk, jv) * jt.array(proj.astype(np.float32))).sum()
    grads = [g.numpy() for g in jt.grad(loss, [jq, jk, jv])]

    def f(q_, k_, v_):
        return float((reference_cca(q_, k_, v_) * proj).sum())

    eps = 1e-6
    for which, grad in enumerate(grads):
        args = [q.copy(), k.copy(), v.copy()]
        numeric = np.zeros_like(args[which])
        for idx in np.ndindex(*args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            numeric[idx] = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_new_module_is_identity_and_gamma_scales_the_attention():
    module = CrissCrossAttention(16)
    x = jt.array(np.random.default_rng(1).standard_normal((2, 16, 7, 5)).astype(np.float32))
    with ops.using(cca="jittor"):
        np.testing.assert_array_equal(module(x).numpy(), x.numpy())
        module.gamma.assign(jt.array([0.5]))
        q, k, v = module.query_conv(x), module.key_conv(x), module.value_conv(x)
        expected = 0.5 * criss_cross_attention_plain(q, k, v).numpy() + x.numpy()
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert module.query_conv.weight.shape[0] == 2 and module.value_conv.weight.shape[0] == 16
