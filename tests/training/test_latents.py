"""Latent normalisation of the precomputed training set: per-channel statistics and conversion between
normalisations, so a generator trained in one latent space is fed the same clips in it."""

import dataclasses

import pytest
import torch

from aptserve.engines.vae import VAEConfig
from aptserve.training.data import COLOURS, MOTIONS, SHAPES, ShapeSpec, named_attributes, shorter_captions
from aptserve.training.latents import LatentSet, renormalise
from aptserve.training.stage_diffusion import latent_normalisation


def latent_set(scale: torch.Tensor, offset: torch.Tensor, stats=(0.5, 2.0)) -> LatentSet:
    """Eight clips whose raw channel c has mean offset[c] and std scale[c], stored in `stats` normalisation."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(8, 16, 13, 8, 8, generator=g, dtype=torch.float64)
    raw = (raw - raw.mean(dim=(0, 2, 3, 4), keepdim=True)) / raw.std(dim=(0, 2, 3, 4), keepdim=True, correction=0)
    raw = raw * scale.view(1, -1, 1, 1, 1) + offset.view(1, -1, 1, 1, 1)
    return LatentSet(
        latents=((raw - stats[0]) / stats[1]).float(),
        caption_ids=torch.zeros(8, dtype=torch.long),
        captions=[""],
        text_tokens=torch.zeros(1, 4, 8),
        text_mask=torch.ones(1, 4, dtype=torch.bool),
        latent_mean=stats[0],
        latent_std=stats[1],
    )


SCALE = torch.linspace(0.4, 1.9, 16, dtype=torch.float64)
OFFSET = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)


def test_raw_channel_statistics_undo_the_stored_normalisation():
    mean, std, head_mean, head_std = latent_set(SCALE, OFFSET).raw_statistics()
    assert head_mean == head_std == ()
    assert len(mean) == len(std) == 16
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), OFFSET, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), SCALE, atol=1e-5, rtol=0)


def test_channel_normalisation_gives_unit_channels_and_converts_back():
    data = latent_set(SCALE, OFFSET)
    vae = latent_normalisation(data, VAEConfig(latent_mean=0.5, latent_std=2.0), "channel")
    assert vae.latent_std == pytest.approx(tuple(SCALE.tolist()), abs=1e-5)
    per_channel = data.normalised_as(vae)
    assert per_channel.latent_std == vae.latent_std and per_channel.caption_ids is data.caption_ids
    z = per_channel.latents.double()
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(16, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        z.std(dim=(0, 2, 3, 4), correction=0), torch.ones(16, dtype=torch.float64), atol=1e-5, rtol=0
    )
    back = per_channel.normalised_as(VAEConfig(latent_mean=0.5, latent_std=2.0))
    torch.testing.assert_close(back.latents, data.latents, atol=1e-5, rtol=1e-5)
    assert data.normalised_as(VAEConfig(latent_mean=0.5, latent_std=2.0)) is data  # already there: no copy


def test_renormalise_is_the_affine_map_between_two_normalisations():
    x = torch.randn(2, 16, 3, 2, 2)
    new = (tuple(range(16)), tuple(0.5 + c for c in range(16)))
    y = renormalise(x, (0.1, 1.5, (), ()), (*new, (), ()))
    for c in (0, 9):
        torch.testing.assert_close(y[:, c], (x[:, c] * 1.5 + 0.1 - c) / (0.5 + c))


def test_vae_normalisation_and_bad_kinds():
    data = latent_set(SCALE, OFFSET)
    vae = VAEConfig(latent_mean=0.5, latent_std=2.0)
    assert latent_normalisation(data, vae, "vae") is vae
    with pytest.raises(ValueError, match="unknown latent_norm 'layer'"):
        latent_normalisation(data, vae, "layer")


def test_a_latent_file_without_its_normalisation_is_refused(tmp_path):
    fields = dataclasses.asdict(latent_set(SCALE, OFFSET))
    del fields["latent_mean"], fields["latent_std"]
    torch.save(fields, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="does not record its latent normalisation"):
        LatentSet.load(tmp_path / "old.pt")


def test_first_frames_normalised_apart():
    data = latent_set(SCALE, OFFSET)
    quiet = data.latents.clone()
    quiet[:, :, 0] = quiet[:, :, 0] * 0.25 + 0.3  # a quieter, shifted first latent frame, as a causal VAE's
    data = dataclasses.replace(data, latents=quiet)
    vae = latent_normalisation(data, VAEConfig(latent_mean=0.5, latent_std=2.0), "frames", first_frames=2)
    assert len(vae.first_frames_mean) == len(vae.first_frames_std) == 2
    apart = data.normalised_as(vae)
    z = apart.latents.double()
    for frames in (z[:, :, 0], z[:, :, 1], z[:, :, 2:]):  # each first frame alone, then the rest: unit channels
        per_channel = frames.transpose(0, 1).reshape(16, -1)
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            per_channel.std(1, correction=0), torch.ones(16, dtype=torch.float64), atol=1e-4, rtol=0
        )
    assert apart.normalisation == vae.normalisation
    back = apart.normalised_as(VAEConfig(latent_mean=0.5, latent_std=2.0))
    torch.testing.assert_close(back.latents, data.latents, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="first_frames must be in"):
        data.raw_statistics(first_frames=13)


def test_shorter_captions_are_encoded_indexed_and_drawn(minilm):
    full = [ShapeSpec("red", "circle", "left", "black", "large", "slowly").caption]
    full.append(ShapeSpec("blue", "star", "growing", "white", "small", "quickly").caption)
    data = dataclasses.replace(
        latent_set(SCALE, OFFSET),
        caption_ids=torch.tensor([1, 2] * 4),
        captions=["", *full],
        text_tokens=torch.cat([torch.zeros(1, 32, 384), minilm.encode(full)[0]]).half(),
        text_mask=torch.cat([torch.zeros(1, 32, dtype=torch.bool), minilm.encode(full)[1]]),
    )
    more = data.with_shorter_captions(minilm)
    assert more.with_shorter_captions(minilm) is more and data.shorter_ids is None
    assert len(more.captions) == 3 + 14 and more.captions[:3] == data.captions
    assert more.shorter_ids.shape == (17, 7)
    for row, caption in ((1, full[0]), (2, full[1])):
        assert [more.captions[i] for i in more.shorter_ids[row]] == shorter_captions(caption)
    short = more.captions.index("a red circle moving left")
    assert more.shorter_ids[short].tolist() == [short] * 7  # no shorter caption of its own
    torch.testing.assert_close(
        more.text_tokens[short].float(), minilm.encode(["a red circle moving left"])[0][0].half().float()
    )
    torch.manual_seed(0)
    _, text, _ = more.batch(torch.arange(8), shorter=1.0)
    for i in range(8):  # every sample captioned by one of its own clip's shorter captions
        caption_row = int(more.caption_ids[i])
        candidates = more.text_tokens[more.shorter_ids[caption_row]].float()
        assert any(torch.equal(text[i], c) for c in candidates)
    _, text, _ = more.batch(torch.arange(8))
    assert torch.equal(text, more.text_tokens[more.caption_ids].float())
    with pytest.raises(ValueError, match="no shorter captions"):
        data.batch(torch.arange(2), shorter=0.5)


def test_swapped_captions_change_one_attribute_and_nothing_else(minilm):
    """The hard negatives of a matching-aware D: each caption row (full and shorter) with exactly one of colour,
    shape or motion changed, encoded as any caption is; `swapped` draws only the attributes it is asked to."""
    full = [ShapeSpec("red", "circle", "left", "black", "large", "slowly").caption]
    data = dataclasses.replace(
        latent_set(SCALE, OFFSET),
        caption_ids=torch.ones(8, dtype=torch.long),
        captions=["", *full],
        text_tokens=torch.cat([torch.zeros(1, 32, 384), minilm.encode(full)[0]]).half(),
        text_mask=torch.cat([torch.zeros(1, 32, dtype=torch.bool), minilm.encode(full)[1]]),
    ).with_shorter_captions(minilm)
    with pytest.raises(ValueError, match="no swapped captions"):
        data.swapped(torch.tensor([1]))
    more = data.with_swapped_captions(minilm)
    assert more.with_swapped_captions(minilm) is more
    with pytest.raises(ValueError, match="before swapped"):
        dataclasses.replace(more, shorter_ids=None).with_shorter_captions(minilm)
    values = (tuple(COLOURS), SHAPES, MOTIONS)
    for row in range(1, len(data.captions)):  # the full caption and its 7 shorter ones
        own = named_attributes(data.captions[row])
        for a, name in enumerate(("colour", "shape", "motion")):
            for v, value in enumerate(values[a]):
                swap = int(more.swapped_ids[row, a, v])
                if value == own[name]:
                    assert swap == -1
                    continue
                assert named_attributes(more.captions[swap]) == {**own, name: value}
                if name != "motion":  # "growing" replaces "moving left" as a phrase
                    assert more.captions[swap].replace(value, own[name]) == data.captions[row]
                torch.testing.assert_close(
                    more.text_tokens[swap].float(), minilm.encode([more.captions[swap]])[0][0].half().float()
                )
    assert (more.swapped_ids[0] == -1).all() and (more.swapped_ids[len(data.captions) :] == -1).all()
    assert more.shorter_ids.shape[0] == len(more.captions)  # swapped rows list themselves as their shorter captions
    torch.manual_seed(0)
    rows = more.caption_rows(torch.arange(8).repeat(4), shorter=0.5)

    def named_by(tokens: torch.Tensor) -> dict[str, str]:  # the attributes of the caption these tokens encode
        match = [i for i in range(len(more.captions)) if torch.equal(more.text_tokens[i].float(), tokens)]
        return named_attributes(more.captions[match[0]])

    text, _ = more.swapped(rows, ("shape",))
    for row, t in zip(rows.tolist(), text):
        named, own = named_by(t), named_attributes(more.captions[row])
        assert named["shape"] != own["shape"] and {**named, "shape": own["shape"]} == own
    # a pair swaps only to each other: every circle caption's negative is its square, and the other attributes
    # still swap to any other value
    swaps = [more.swapped(rows, ("colour", "shape"), (("circle", "square"),))[0] for _ in range(8)]
    changed = set()
    for row, t in zip(rows.tolist() * 8, torch.cat(swaps)):
        named, own = named_by(t), named_attributes(more.captions[row])
        if "shape" in own and named["shape"] != own["shape"]:
            assert named["shape"] == "square"
        changed |= {name for name in own if named[name] != own[name]}
    assert changed == {"colour", "shape"}
    with pytest.raises(ValueError, match="differ must name"):
        more.swapped(rows, ("size",))
    with pytest.raises(ValueError, match="has no swap"):
        more.swapped(torch.tensor([0]))  # the empty prompt names nothing to swap
