import dataclasses

import numpy as np
import pytest

from aptserve.engines.config import MODEL_PRESETS, ModelConfig
from aptserve.engines.prompts import CaptionGrammar, Slot

GRAMMAR = CaptionGrammar(
    (
        Slot("size", {"small": "small", "large": "large"}),
        Slot("colour", {"red": "red", "blue": "blue"}, required=True),
        Slot("shape", {"circle": "circle", "square": "square"}, required=True),
        Slot("motion", {"left": "moving left", "growing": "growing"}, required=True),
        Slot("background", {"black": "on a black background", "white": "on a white background"}),
    )
)


def test_parse_names_what_the_prompt_says():
    assert GRAMMAR.parse("A red circle, moving left.") == {"colour": "red", "shape": "circle", "motion": "left"}
    assert GRAMMAR.parse("a large blue square growing on a white background") == {
        "size": "large", "colour": "blue", "shape": "square", "motion": "growing", "background": "white",
    }  # fmt: skip


@pytest.mark.parametrize(
    "prompt",
    [
        "a red dog moving left",  # a word outside the vocabulary
        "a red circle moving left with a hat",  # more than the grammar says: it would be dropped
        "a red blue circle moving left",  # two values for one slot
        "a red circle",  # a required slot missing
        "",
    ],
)
def test_prompts_the_grammar_does_not_cover_are_left_as_written(prompt):
    assert GRAMMAR.parse(prompt) is None
    assert GRAMMAR.complete(prompt, seed=3) == prompt


def test_completion_keeps_what_is_named_and_draws_the_rest_by_seed():
    prompt = "a red circle moving left"
    completions = [GRAMMAR.complete(prompt, seed) for seed in range(64)]
    assert completions == [GRAMMAR.complete(prompt, seed) for seed in range(64)]  # a seed names one completion
    for text in completions:
        values = GRAMMAR.parse(text)
        assert values is not None and set(values) == {"size", "colour", "shape", "motion", "background"}
        assert (values["colour"], values["shape"], values["motion"]) == ("red", "circle", "left")
    sizes = {GRAMMAR.parse(t)["size"] for t in completions}
    backgrounds = {GRAMMAR.parse(t)["background"] for t in completions}
    assert sizes == {"small", "large"} and backgrounds == {"black", "white"}
    full = "a small blue square growing on a black background"
    assert GRAMMAR.complete(full, seed=5) == full


def test_one_slot_named_does_not_change_the_draw_of_another():
    free = [GRAMMAR.parse(GRAMMAR.complete("a red circle moving left", s))["background"] for s in range(32)]
    sized = [GRAMMAR.parse(GRAMMAR.complete("a large red circle moving left", s))["background"] for s in range(32)]
    assert free == sized


def test_grammar_round_trips_through_a_model_config():
    config = dataclasses.replace(MODEL_PRESETS["tiny"], prompt_grammar=GRAMMAR.to_dict())
    again = ModelConfig.from_dict(config.to_dict())
    assert CaptionGrammar.from_dict(again.prompt_grammar) == GRAMMAR


@pytest.mark.parametrize(
    "grammar, message",
    [
        ({"slots": [{"name": "colour", "phrases": {}}]}, "no values"),
        ({"slots": [{"name": "motion", "phrases": {"left": "moving right"}}]}, "one word of its phrase"),
        ({"slots": [{"name": "a", "phrases": {"red": "red"}}, {"name": "b", "phrases": {"red": "red"}}]}, "belongs"),
        ({"prefix": "a"}, "slots"),
    ],
)
def test_bad_grammars_are_refused(grammar, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MODEL_PRESETS["tiny"], prompt_grammar=grammar)


def test_the_pipeline_encodes_the_completed_prompt(tiny_pipeline):
    from aptserve.engines.pipeline import Pipeline

    pipeline = Pipeline(
        dataclasses.replace(tiny_pipeline.model, config=dataclasses.replace(
            tiny_pipeline.config, prompt_grammar=GRAMMAR.to_dict()
        )),
        tiny_pipeline.text_encoder,
    )  # fmt: skip
    short, full = "a red circle moving left", GRAMMAR.complete("a red circle moving left", 4)
    request = pipeline.request([short], seeds=[4], seconds=0.5)
    assert pipeline.complete_prompts(request).prompts == [full]
    as_written = pipeline.request([short], seeds=[4], seconds=0.5, complete_prompts=False)
    assert pipeline.complete_prompts(as_written).prompts == [short]
    # a model without a grammar encodes prompts as written
    assert tiny_pipeline.complete_prompts(request).prompts == [short]
    completed, _ = pipeline.generate_video(request)
    written_full, _ = tiny_pipeline.generate_video(tiny_pipeline.request([full], seeds=[4], seconds=0.5))
    written_short, _ = tiny_pipeline.generate_video(as_written)
    assert np.array_equal(completed, written_full)
    assert not np.array_equal(completed, written_short)
