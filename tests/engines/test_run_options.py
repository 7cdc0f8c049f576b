"""RunOptions: the serving configuration as one value, checked against the device before anything loads, and
applied through the same `prepare` call the benchmarks use."""

import pytest
import torch

from aptserve.engines.backends.options import RunOptions
from aptserve.engines.quant import quantized_layer_names


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuda_graphs": True, "backend": "compiled"}, "cuda_graphs needs a CUDA device"),
        ({"fp8_linears": True}, "fp8_linears needs a GPU with FP8 GEMMs"),
        ({"bf16_blocks": (1,)}, "needs fp8_linears"),
        ({"fp8_linears": True, "fp8_emulation": True, "bf16_blocks": (9,)}, "name blocks the generator lacks"),
        ({"attention": "triton"}, "needs CUDA"),
    ],
)
def test_impossible_combinations_say_why_in_one_line(options, message, monkeypatch):
    monkeypatch.setattr("aptserve.engines.backends.options.INTERPRETED", False)
    with pytest.raises(ValueError, match=message) as info:
        RunOptions(**options).check("cpu", depth=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("backend", "tensor"), ("attention", "flash"), ("decoder", "tiny"), ("compiler", "x")]
)
def test_unknown_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        RunOptions(**{field: value})


def test_fp8_emulation_runs_on_the_cpu_and_keeps_the_named_blocks(tiny_pipeline):
    import copy

    options = RunOptions(fp8_linears=True, fp8_emulation=True, bf16_blocks=(0,))
    options.check("cpu", depth=len(tiny_pipeline.dit.blocks))
    dit = options.apply(copy.deepcopy(tiny_pipeline.dit))
    names = quantized_layer_names(dit)
    assert names and not any(name.startswith("blocks.0.") for name in names)
    assert any(name.startswith("blocks.1.") for name in names)
    x = torch.randn(1, 16, 2, 4, 4)
    text, mask = torch.randn(1, 8, dit.config.text_dim), torch.ones(1, 8, dtype=torch.bool)
    with torch.inference_mode():
        out, ref = dit(x, torch.ones(1), text, mask), tiny_pipeline.dit(x, torch.ones(1), text, mask)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # e4m3 weights and tokens: a few percent at most


def test_describe_names_every_option():
    described = RunOptions(backend="compiled", fp8_linears=True, fp8_emulation=True).describe()
    assert described["backend"] == "compiled" and described["fp8_linears"] is True
    assert set(described) >= {"backend", "attention", "fp8_linears", "bf16_blocks", "cuda_graphs", "decoder"}


def test_tensorrt_is_selectable_and_says_what_it_needs(monkeypatch):
    """Without TensorRT, selecting it is one line saying what to install; with it, it needs CUDA and an export."""
    with pytest.raises(ValueError, match=r"needs the tensorrt package.*pip install tensorrt") as info:
        RunOptions(backend="tensorrt", tensorrt_dir="export").check("cuda")
    assert "\n" not in str(info.value)
    monkeypatch.setattr("aptserve.engines.backends.options.tensorrt_version", lambda: "10.9.0")
    with pytest.raises(ValueError, match="runs on CUDA from tensorrt_dir"):
        RunOptions(backend="tensorrt").check("cuda")
    with pytest.raises(ValueError, match="runs on CUDA from tensorrt_dir"):
        RunOptions(backend="tensorrt", tensorrt_dir="export").check("cpu")
    RunOptions(backend="tensorrt", tensorrt_dir="export").check("cuda")
    with pytest.raises(ValueError, match="set that backend or drop it"):
        RunOptions(tensorrt_dir="export").check("cpu")
