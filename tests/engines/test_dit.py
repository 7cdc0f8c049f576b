import pytest
import torch

from aptserve.engines.dit import DIT_PRESETS, DiTConfig, MMDiT, apply_rope, rope_3d, rope_axis_dims

SMALL = DiTConfig(depth=2, hidden_size=64, num_heads=4, text_dim=24)


def small_model(seed=0):
    model = MMDiT(SMALL)
    model.init_weights(torch.Generator().manual_seed(seed), zero_out=False)
    return model.eval()


def inputs(b=2, f=3, h=4, w=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=g)
    text = torch.randn(b, length, SMALL.text_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, 4:] = False
    return x, torch.rand(b, generator=g), text, mask


def test_apt_8b_builds_on_meta_with_about_8b_parameters():
    with torch.device("meta"):
        model = MMDiT(DIT_PRESETS["apt-8b"])
    count = sum(p.numel() for p in model.parameters())
    assert 7.9e9 <= count <= 8.5e9, count
    assert len(model.blocks) == 36 and model.config.head_dim == 128


def test_forward_shape_and_padding_is_ignored():
    model = small_model()
    x, t, text, mask = inputs()
    with torch.no_grad():
        out = model(x, t, text, mask)
        garbage = text.clone()
        garbage[:, 4:] = 100.0  # padded positions must not matter
        out2 = model(x, t, garbage, mask)
    assert out.shape == x.shape
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)


def test_output_depends_on_text_and_time():
    model = small_model()
    x, t, text, mask = inputs()
    with torch.no_grad():
        base = model(x, t, text, mask)
        assert not torch.allclose(base, model(x, t, text.flip(0), mask))
        assert not torch.allclose(base, model(x, 1 - t, text, mask))


def test_zero_init_starts_at_zero_velocity_but_gets_gradients_everywhere():
    model = MMDiT(SMALL)
    model.init_weights()
    x, t, text, mask = inputs()
    out = model(x, t, text, mask)
    assert out.abs().max() == 0
    small_model()(x, t, text, mask).square().mean().backward()  # random init: every parameter is used
    model = small_model()
    model(x, t, text, mask).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not unused


def test_patchify_round_trip():
    model = small_model()
    x = torch.randn(2, 16, 3, 4, 6)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 3 * 2 * 3, 64)
    torch.testing.assert_close(model.unpatchify(tokens, (3, 2, 3)), x)


def test_rope_is_a_rotation_and_relative():
    dims = rope_axis_dims(64)
    assert sum(dims) == 64 and all(d % 2 == 0 for d in dims)
    angles = rope_3d((2, 3, 4), 64, 10000.0, torch.device("cpu"))
    assert angles.shape == (24, 32)
    q = torch.randn(1, 1, 24, 64)
    torch.testing.assert_close(apply_rope(q, angles).norm(dim=-1), q.norm(dim=-1))
    # Scores depend on relative positions only: shifting both tokens in time leaves q.k unchanged.
    a = rope_3d((3, 1, 1), 64, 10000.0, torch.device("cpu"))
    u, v = torch.randn(64), torch.randn(64)
    ru = lambda i: apply_rope(u.view(1, 1, 1, -1), a[i : i + 1]).flatten()  # noqa: E731
    rv = lambda i: apply_rope(v.view(1, 1, 1, -1), a[i : i + 1]).flatten()  # noqa: E731
    torch.testing.assert_close(ru(0) @ rv(1), ru(1) @ rv(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0, "hidden_size": 64, "num_heads": 4}, "must be >= 1"),
        ({"depth": 2, "hidden_size": 65, "num_heads": 4}, "not divisible"),
        ({"depth": 2, "hidden_size": 32, "num_heads": 4}, "too small"),
        ({"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": (1, 2)}, "patch_size"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**kwargs)


def test_bad_inputs_raise():
    model = small_model()
    x, t, text, mask = inputs(w=5)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(x, t, text, mask)
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="text dim"):
        model(x, t, text[..., :5], mask)
