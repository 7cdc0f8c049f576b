import pytest
import torch

from aptserve import kernels


def make_qkv(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk)]


def naive(q, k, v, mask=None):
    # Independent fp64 loop-free formulation: per batch, drop padded keys entirely.
    out = []
    for i in range(q.shape[0]):
        keep = slice(None) if mask is None else mask[i]
        kk, vv = k[i][:, keep].double(), v[i][:, keep].double()
        w = torch.softmax(q[i].double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out.append(w @ vv)
    return torch.stack(out)


@pytest.mark.parametrize("impl", ["sdpa", "reference", "auto"])
@pytest.mark.parametrize(("nq", "nk", "d"), [(37, 37, 64), (5, 77, 128), (130, 61, 64)])
def test_attention_matches_fp64_with_padding_mask(impl, nq, nk, d):
    q, k, v = make_qkv(2, 3, nq, nk, d, torch.float32)
    mask = torch.ones(2, nk, dtype=torch.bool)
    mask[0, nk // 3 :] = False
    out = kernels.attention(q, k, v, mask, impl=impl)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), naive(q, k, v, mask), atol=2e-5, rtol=1e-4)


def test_attention_bf16_error_close_to_plain_torch():
    q, k, v = make_qkv(1, 2, 50, 50, 64, torch.bfloat16)
    ref = naive(q, k, v)
    sdpa_err = (kernels.attention(q, k, v, impl="sdpa").double() - ref).abs().max()
    plain_err = (kernels.reference_attention(q.float(), k.float(), v.float()).bfloat16().double() - ref).abs().max()
    assert sdpa_err <= 2 * plain_err + 1e-3


def test_bad_inputs_raise():
    q, k, v = make_qkv(1, 2, 4, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        kernels.attention(q, k, v, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected q"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="unknown attention impl"):
        kernels.attention(q, k, v, impl="nope")
