"""One-shot GPU check: bf16 matmul peak, attention, apt-8b one step, Wan-sized VAE decode, end to end, Wan2.1 1.3B
one step and Wan2.1 VAE decode, peak memory.

    PYTHONPATH=. python bench/gpu_check.py [--json results.json] [--budget-s 420] [--only dit,vae]  # one H100
    .venv/bin/python bench/gpu_check.py --tiny [--threads 1] [--json results.json]       # CPU, tiny shapes, CI

Prints machine info and one markdown table (ready for docs/PERF.md); `--json` gets the same rows, rewritten after
every row so a run cut short still leaves its results. Every row is guarded: a failure prints its error in the table
and the script goes on; a row that would start after `--budget-s` is skipped. Rows run cheapest first and compiled
ones last (the first call, which compiles, is reported apart from the median), but the table keeps a fixed order.
Random weights throughout (apt-8b is built in bf16 directly on the GPU); end to end excludes text encoding (random
text tokens: the server caches prompt encodings). `--tiny` runs the same code on the CPU in fp32 with one untimed
warm-up fewer: tiny DiT at 64x64x49, the tiny VAE in the "wan" rows and a half-width decoder in the "wan-light"
rows, wan-tiny and an 8-channel VAE in the Wan2.1 layout in the "wan2.1" rows, small matmul and attention; Triton
rows are skipped (they need CUDA), FP8 linears use their CPU emulation, and compiled rows use torch.compile's
"aot_eager" backend unless `--compiler inductor` (inductor's C++ build takes minutes on a 2-core CI machine;
tests/engines/test_backends.py checks inductor). Imports only torch and
`aptserve.engines` and `aptserve.kernels`: the GPU machine has no FastAPI or other server dependencies, and runs the
checkout without installing it (hence PYTHONPATH=. there; a venv from the lock has the package installed).
VAE rows decode latent frame by latent frame, as the server streams; a whole-clip decode at 1280x720x49 needs single
16 GiB activations and ran out of memory beside the earlier rows on an 80 GB H100 (docs/PERF.md).
The "wan2.1" rows run last, once apt-8b is freed: `--only wan2.1` runs just them (no other row's name contains it).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_report import GIB, Report, Row, _free_memory, _sync, machine_info, print_table, relative_error, time_call

from aptserve import kernels
from aptserve.engines.backends.options import RunOptions
from aptserve.engines.config import MODEL_PRESETS, ModelConfig
from aptserve.engines.dit import DiTConfig, MMDiT
from aptserve.engines.flops import FlopCount, latent_shape, mmdit_flops, wan_flops
from aptserve.engines.quant import quantized_layer_names
from aptserve.engines.vae import VAE_PRESETS, CausalVAE, VAEConfig
from aptserve.engines.wan import WAN_PRESETS, WanConfig, WanTransformer
from aptserve.kernels.attention import reference_attention
from aptserve.kernels.triton_attention import unsupported_reason

# Logical table order: row name -> what it measures (kept in the JSON; the table shows the per-run notes).
ROWS: dict[str, str] = {
    "matmul": "square matmul in the run's dtype, median; the peak the other rows are compared with",
    "attention sdpa": "torch SDPA with the key padding mask",
    "attention triton": "Triton flash attention, bf16",
    "attention triton_fp8": "Triton flash attention, e4m3 Q/K/V/P",
    "attention triton_int8": "Triton 8-bit attention: INT8 Q.K^T, FP8 P.V (SageAttention2's scheme)",
    "dit eager sdpa": "one generator step, SDPA attention",
    "dit eager triton": "one generator step, Triton attention",
    "dit eager fp8 linears": "+ FP8 linears, Triton attention (SDPA where Triton cannot run)",
    "dit eager fp8 linears + fp8 attention": "+ FP8 linears and FP8 Triton attention",
    "dit eager fp8 linears + int8 attention": "+ FP8 linears and the 8-bit Triton attention (--tiny: its emulation)",
    "dit compiled fp8 linears": "+ torch.compile of the blocks, FP8 linears, the faster eager FP8 row's attention",
    "vae wan chunked": "Wan-sized decoder, latent frame by latent frame, each chunk to host uint8 (as the server does)",
    "vae wan channels-last chunked": "NDHWC activations",
    "vae wan compiled chunked": "torch.compile of the decoder (pointwise work fused around the convs)",
    "vae wan-light chunked": "light decoder (wan-light: 64/128/256/256 channels, 2 blocks per stage)",
    "vae wan-light channels-last compiled chunked": "light decoder, NDHWC, compiled: the decode fast path",
    "e2e eager fast path": "noise -> DiT (FP8, faster attention) -> light VAE chunks on the host; text encode excluded",
    "e2e compiled fast path": "as above with the compiled DiT and the compiled channels-last light VAE",
    "served fast path": "the worker's path on those modules: Pipeline.generate, uint8 chunks, the fMP4 encoder",
    "wan2.1 eager sdpa": "Wan2.1 generator (1.3B) one step, SDPA attention, text padded to 512 tokens as Wan does",
    "wan2.1 eager triton": "Wan2.1 generator, Triton attention",
    "wan2.1 eager fp8 linears": "+ FP8 linears (WAN_SKIP modules in bf16), Triton attention (SDPA where it cannot run)",
    "wan2.1 compiled fp8 linears": "+ torch.compile of the blocks",
    "wan2.1 vae chunked": "Wan2.1's own VAE (126.9M), latent frame by latent frame, each chunk to host uint8",
    "peak memory": "largest device memory any row held (CPU: process peak RSS)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Plan: shapes and repeat counts for the H100 run and for --tiny


@dataclass(frozen=True)
class WanPlan:
    """The "wan2.1" rows: generator, VAE and clip. Text is always generator.text_len tokens (Wan zero-pads to it)."""

    generator: WanConfig
    vae: VAEConfig
    frames: int
    width: int
    height: int

    @property
    def latent(self) -> tuple[int, int, int]:
        factor = self.vae.spatial_factor
        return self.vae.latents_for_frames(self.frames), self.height // factor, self.width // factor

    @property
    def clip(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: torch.dtype
    model: ModelConfig  # generator + Wan-sized VAE
    vae_light: VAEConfig
    wan: WanPlan
    frames: int
    width: int
    height: int
    text_tokens: int
    matmul_n: int
    attn_heads: int
    attn_head_dim: int
    reference_rows: int  # query rows the fp32 attention reference is computed on
    warmup: int
    repeats: int
    matmul_repeats: int
    compiler: str
    tiny: bool
    compile_reserve_s: float  # budget a compiled row needs left before it starts

    @property
    def attn_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_tokens(self) -> int:
        return workload_flops(self, "dit").video_tokens


def full_plan(compiler: str) -> Plan:
    """apt-8b at 1280x720x49 (46,800 video + 256 text tokens = 47,056), Wan-sized VAE, bf16 on the GPU; Wan2.1 1.3B
    and its VAE at 832x480x81 (latent 21x60x104: 32,760 video + 512 text tokens)."""
    wan = WanPlan(WAN_PRESETS["wan2.1-1.3b"], VAE_PRESETS["wan2.1"], frames=81, width=832, height=480)
    return Plan(
        device="cuda", dtype=torch.bfloat16, model=MODEL_PRESETS["apt-8b"], vae_light=VAE_PRESETS["wan-light"],
        wan=wan, frames=49, width=1280, height=720, text_tokens=256, matmul_n=8192, attn_heads=24, attn_head_dim=128,
        reference_rows=512, warmup=1, repeats=2, matmul_repeats=10, compiler=compiler, tiny=False,
        compile_reserve_s=90.0,
    )  # fmt: skip


def tiny_plan(compiler: str) -> Plan:
    """The same rows on the CPU in fp32: tiny DiT at 64x64x49 (208 + 32 tokens), tiny VAE and a half-width decoder;
    wan-tiny at 64x64x49 (208 + 16 tokens) and the Wan2.1 VAE layout at 8 base channels."""
    tiny = MODEL_PRESETS["tiny"]
    light = dataclasses.replace(tiny.vae, decoder_base_channels=8)
    wan_vae = dataclasses.replace(VAE_PRESETS["wan2.1"], base_channels=8)
    wan = WanPlan(WAN_PRESETS["wan-tiny"], wan_vae, frames=49, width=64, height=64)
    return Plan(
        device="cpu", dtype=torch.float32, model=tiny, vae_light=light, wan=wan, frames=49, width=64, height=64,
        text_tokens=32, matmul_n=512, attn_heads=4, attn_head_dim=64, reference_rows=64, warmup=0, repeats=1,
        matmul_repeats=5, compiler=compiler, tiny=True, compile_reserve_s=0.0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Matmul and attention


def measure_matmul(plan: Plan) -> dict[str, Any]:
    n = plan.matmul_n
    a = torch.randn(n, n, device=plan.device, dtype=plan.dtype)
    b = torch.randn(n, n, device=plan.device, dtype=plan.dtype)
    seconds, _, _ = time_call(lambda: a @ b, plan.device, 3, plan.matmul_repeats)
    return {"seconds": seconds, "flops": 2.0 * n**3, "note": f"{n}^3, {str(plan.dtype).removeprefix('torch.')}"}


def attention_inputs(plan: Plan) -> dict[str, torch.Tensor]:
    """Joint [text; video] sequence, a quarter of the text tokens padded; an fp32 reference on a strided subset."""
    g = torch.Generator(device=plan.device).manual_seed(0)
    shape = (1, plan.attn_heads, plan.attn_tokens, plan.attn_head_dim)
    q, k, v = (torch.randn(shape, device=plan.device, dtype=plan.dtype, generator=g) for _ in range(3))
    mask = text_mask(plan)
    mask = torch.cat([mask, torch.ones(1, plan.video_tokens, dtype=torch.bool, device=plan.device)], dim=1)
    rows = torch.linspace(0, plan.attn_tokens - 1, plan.reference_rows, device=plan.device).long()
    reference = reference_attention(q[:, :, rows].float(), k.float(), v.float(), mask)  # (1, H, rows, D) fp32
    return {"q": q, "k": k, "v": v, "mask": mask, "rows": rows, "reference": reference}


def text_mask(plan: Plan, tokens: int | None = None) -> torch.Tensor:
    """(1, tokens) with the last quarter padding; `tokens` defaults to the plan's text_tokens."""
    tokens = plan.text_tokens if tokens is None else tokens
    mask = torch.zeros(1, tokens, dtype=torch.bool, device=plan.device)
    mask[:, : tokens * 3 // 4] = True
    return mask


def measure_attention(plan: Plan, inputs: dict[str, torch.Tensor], impl: str) -> dict[str, Any]:
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    seconds, first, out = time_call(lambda: kernels.attention(q, k, v, mask, impl=impl), plan.device, 1, plan.repeats)
    sub, ref = out[:, :, inputs["rows"]].float(), inputs["reference"]
    n = plan.attn_tokens
    return {
        "seconds": seconds,
        "flops": 4.0 * plan.attn_heads * n * n * plan.attn_head_dim,
        "error": relative_error(sub, ref),
        "note": f"{n} tokens, {plan.attn_heads}x{plan.attn_head_dim}; error vs fp32 on {len(inputs['rows'])} rows, "
        f"max abs {(sub - ref).abs().max().item():.2e}; first call {first:.2f} s",
    }


def triton_skip(plan: Plan, fp8: bool) -> str | None:
    if plan.tiny:
        return "needs CUDA (--tiny runs on the CPU)"
    probe = torch.empty(1, 1, 1, plan.attn_head_dim, device=plan.device, dtype=plan.dtype)
    return unsupported_reason(probe, fp8=fp8)


def attention_section(report: Report) -> None:
    plan = report.plan
    state: dict[str, Any] = {}

    def inputs() -> dict[str, torch.Tensor]:
        if "inputs" not in state:
            state["inputs"] = attention_inputs(plan)
        return state["inputs"]

    for impl in ("sdpa", "triton", "triton_fp8", "triton_int8"):
        skip = None if impl == "sdpa" else triton_skip(plan, fp8=impl != "triton")
        report.run(f"attention {impl}", lambda impl=impl: measure_attention(plan, inputs(), impl), skip)
    state.clear()
    _free_memory(plan.device)


# ---------------------------------------------------------------------------------------------------------------------
# Generator


def workload(plan: Plan, key: str) -> tuple[DiTConfig | WanConfig, tuple[int, int, int], int]:
    """(generator config, latent (F, H, W), text tokens) of the apt-8b rows (key "dit") or the Wan2.1 rows ("wan")."""
    if key == "wan":
        return plan.wan.generator, plan.wan.latent, plan.wan.generator.text_len
    return plan.model.dit, latent_shape(plan.model, plan.frames, plan.width, plan.height), plan.text_tokens


def workload_flops(plan: Plan, key: str) -> FlopCount:
    config, latent, text_tokens = workload(plan, key)
    return (wan_flops if isinstance(config, WanConfig) else mmdit_flops)(config, latent, text_tokens)


def build_dit(plan: Plan, key: str = "dit") -> MMDiT | WanTransformer:
    """Random weights made directly on the device in the run's dtype (apt-8b: about 16.5 GB), never fp32 on the host."""
    config = workload(plan, key)[0]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)
    try:
        with torch.device(plan.device):
            model = WanTransformer(config) if isinstance(config, WanConfig) else MMDiT(config)
    finally:
        torch.set_default_dtype(previous)
    model.init_weights(torch.Generator(device=plan.device).manual_seed(0), zero_out=False)
    return model.eval().requires_grad_(False)


def dit_inputs(plan: Plan, key: str = "dit") -> tuple[torch.Tensor, ...]:
    config, latent, text_tokens = workload(plan, key)
    g = torch.Generator(device=plan.device).manual_seed(1)
    z = torch.randn(1, config.in_channels, *latent, device=plan.device, generator=g)
    text = torch.randn(1, text_tokens, config.text_dim, device=plan.device, generator=g)
    t = torch.ones(1, device=plan.device, dtype=plan.dtype)
    return z.to(plan.dtype), t, text.to(plan.dtype), text_mask(plan, text_tokens)


def run_options(plan: Plan, backend: str, attention: str = "auto", fp8: bool = False, **options: Any) -> RunOptions:
    """The server's RunOptions for a row; FP8 runs emulated where the GPU has no FP8 GEMM (the row's note says so)."""
    return RunOptions(
        backend=backend, attention=attention, fp8_linears=fp8, fp8_emulation=fp8, compiler=plan.compiler, **options
    )


def measure_dit(plan: Plan, state: dict[str, Any], backend: str, key: str = "dit", **options: Any) -> dict[str, Any]:
    """One step of the generator `key` names ("dit" or "wan"), built into `state[key]` by the first row that needs it."""
    if key not in state:
        state[key], state[f"{key}_inputs"] = build_dit(plan, key), dit_inputs(plan, key)
    model = state[key]
    run_options(plan, backend, **options).apply(model)  # the call the server makes at load
    inputs = state[f"{key}_inputs"]
    with torch.inference_mode():
        seconds, first, out = time_call(lambda: model(*inputs), plan.device, plan.warmup, plan.repeats)
    flops = workload_flops(plan, key)
    note = f"attention {model.attention_impl}; first call {first:.2f} s"
    if key == "wan":
        note = f"{plan.wan.clip}, {flops.video_tokens} + {flops.text_tokens} tokens; {note}"
    if quantized_layer_names(model):
        note += f"; {len(quantized_layer_names(model))} FP8 linears ({fp8_kind(plan)})"
    values: dict[str, Any] = {"seconds": seconds, "flops": flops.total, "note": note}
    if backend == "eager" and options == {"attention": "sdpa"}:
        state[f"{key}_reference"] = out
    elif f"{key}_reference" in state:
        values["error"] = relative_error(out, state[f"{key}_reference"])
        values["note"] += "; error vs eager sdpa"
    return values


def fp8_kind(plan: Plan) -> str:
    if plan.device != "cuda":
        return "CPU emulation"
    capability = torch.cuda.get_device_capability()
    return "torch._scaled_mm" if capability >= (9, 0) else f"dequantised fallback on sm{capability[0]}{capability[1]}"


def dit_rows(plan: Plan, fast_attention: str) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """(row, backend, prepare options, skip reason) in run order; later rows build on the earlier ones."""
    no_triton, no_fp8 = triton_skip(plan, fp8=False), triton_skip(plan, fp8=True)
    int8 = "int8_emulated" if plan.tiny else "triton_int8"  # the CPU run checks the row with the kernel's emulation
    return [
        ("dit eager sdpa", "eager", {"attention": "sdpa"}, None),
        ("dit eager triton", "eager", {"attention": "triton"}, no_triton),
        ("dit eager fp8 linears", "eager", {"attention": fast_attention, "fp8": True}, None),
        ("dit eager fp8 linears + fp8 attention", "eager", {"attention": "triton_fp8", "fp8": True}, no_fp8),
        (
            "dit eager fp8 linears + int8 attention",
            "eager",
            {"attention": int8, "fp8": True},
            None if plan.tiny else no_fp8,
        ),
    ]


def dit_section(report: Report, state: dict[str, Any]) -> None:
    """The eager rows; afterwards the model keeps FP8 linears and the faster of the two FP8 rows' attention."""
    plan = report.plan
    fast_attention = "triton" if triton_skip(plan, fp8=False) is None else "sdpa"
    state["fast_attention"] = fast_attention
    for name, backend, options, skip in dit_rows(plan, fast_attention):
        report.run(name, lambda b=backend, o=options: measure_dit(plan, state, b, **o), skip)
    candidates = {
        fast_attention: report.rows["dit eager fp8 linears"],
        "triton_fp8": report.rows["dit eager fp8 linears + fp8 attention"],
        "int8_emulated" if plan.tiny else "triton_int8": report.rows["dit eager fp8 linears + int8 attention"],
    }
    timed = {impl: row.seconds for impl, row in candidates.items() if row.status == "ok" and row.seconds}
    if "dit" in state and timed and quantized_layer_names(state["dit"]):
        state["fast_attention"] = state["dit"].attention_impl = min(timed, key=timed.get)
        state["dit_fast"] = state["dit"]


def dit_compiled_row(report: Report, state: dict[str, Any]) -> None:
    plan = report.plan
    skip = None if "dit" in state else "no generator (an earlier DiT row failed)"
    options = {"attention": state.get("fast_attention", "sdpa"), "fp8": True}
    name = "dit compiled fp8 linears"
    report.run(name, lambda: measure_dit(plan, state, "compiled", **options), skip, plan.compile_reserve_s)
    if report.rows[name].status == "ok":
        state["dit_fast"] = state["dit"]
    else:
        state.pop("dit_fast", None)


# ---------------------------------------------------------------------------------------------------------------------
# VAE decode


VAE_VARIANTS = {  # row prefix -> (light decoder, channels-last, compiled)
    "vae wan": (False, False, False),
    "vae wan channels-last": (False, True, False),
    "vae wan compiled": (False, False, True),
    "vae wan-light": (True, False, False),
    "vae wan-light channels-last compiled": (True, True, True),
}


def build_vae(plan: Plan, config: VAEConfig, channels_last: bool = False, compiled: bool = False) -> CausalVAE:
    torch.manual_seed(0)
    with torch.device(plan.device):
        vae = CausalVAE(config)
    vae = vae.to(plan.dtype).eval().requires_grad_(False)
    return run_options(plan, "compiled" if compiled else "eager", channels_last=channels_last).apply(vae)


def to_host_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8 on the host, as the server hands frames to the encoder."""
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu()


def decode_chunked(vae: CausalVAE, latent: torch.Tensor, on_first: Callable[[], None] | None = None) -> torch.Tensor:
    cache, videos = vae.init_decode_cache(), []
    for index in range(latent.shape[2]):
        video, cache = vae.decode_chunk(latent[:, :, index : index + 1], cache)
        to_host_uint8(video)
        videos.append(video)
        if index == 0 and on_first is not None:
            on_first()
    return torch.cat(videos, dim=2)


def vae_latent(plan: Plan, config: VAEConfig, latent: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator(device=plan.device).manual_seed(2)
    return torch.randn(1, config.latent_channels, *latent, device=plan.device, generator=g).to(plan.dtype)


def measure_vae(plan: Plan, state: dict[str, Any], prefix: str) -> dict[str, Any]:
    key = f"vae:{prefix}"
    light, channels_last, compiled = VAE_VARIANTS[prefix]
    if key not in state:
        state[key] = build_vae(plan, plan.vae_light if light else plan.model.vae, channels_last, compiled)
    if "latent" not in state:
        state["latent"] = vae_latent(plan, plan.model.vae, workload(plan, "dit")[1])
    vae, latent = state[key], state["latent"]
    with torch.inference_mode():
        seconds, first, video = time_call(lambda: decode_chunked(vae, latent), plan.device, plan.warmup, plan.repeats)
    shape = "x".join(str(s) for s in latent.shape[2:])
    values: dict[str, Any] = {"seconds": seconds, "note": f"latent {shape}; first call {first:.2f} s"}
    reference_key = f"vae_reference:{light}"  # same light flag: same weights (seeded)
    if not (channels_last or compiled):
        state[reference_key] = video
    elif reference_key in state:
        values["error"] = relative_error(video, state[reference_key])
        values["note"] += "; error vs the eager chunked decode"
    return values


def vae_section(report: Report, state: dict[str, Any], compiled: bool) -> None:
    for prefix, (_, _, is_compiled) in VAE_VARIANTS.items():
        if is_compiled != compiled:
            continue
        reserve = report.plan.compile_reserve_s if compiled else 0.0
        report.run(f"{prefix} chunked", lambda p=prefix: measure_vae(report.plan, state, p), reserve_s=reserve)
        if not compiled and prefix != "vae wan-light":  # keep the light eager decoder for end to end
            state.pop(f"vae:{prefix}", None)
            _free_memory(report.plan.device)


# ---------------------------------------------------------------------------------------------------------------------
# End to end and memory


def measure_e2e(plan: Plan, dit: MMDiT, vae: CausalVAE) -> dict[str, Any]:
    z, t, text, mask = dit_inputs(plan)
    first_chunk: list[float] = []

    def run() -> None:
        start = time.perf_counter()

        def mark() -> None:
            _sync(plan.device)
            first_chunk.append(time.perf_counter() - start)

        latent = z - dit(z, t, text, mask)  # x0 = z - v(z, t=1)
        decode_chunked(vae, latent, on_first=mark)

    with torch.inference_mode():
        seconds, _, _ = time_call(run, plan.device, plan.warmup, plan.repeats)
    clip_s = (plan.frames - 1) / plan.model.fps
    note = (
        f"{plan.width}x{plan.height}x{plan.frames}, attention {dit.attention_impl}, text encode excluded; "
        f"first chunk on host after "
        f"{statistics.median(first_chunk):.3f} s; realtime factor {clip_s / seconds:.2f} ({clip_s:.2f} s of video)"
    )
    return {"seconds": seconds, "note": note}


def e2e_row(report: Report, state: dict[str, Any], name: str, vae_key: str) -> None:
    dit, vae = state.get("dit_fast"), state.get(vae_key)
    skip = None if dit is not None and vae is not None else "needs the DiT and VAE rows it builds on"
    report.run(name, lambda: measure_e2e(report.plan, dit, vae), skip)


class FixedText:
    """Random text tokens in place of the text encoder, as an LRU-cache hit is in the server (text encode excluded)."""

    def __init__(self, plan: Plan):
        g = torch.Generator(device=plan.device).manual_seed(3)
        shape = (1, plan.text_tokens, plan.model.dit.text_dim)
        self.tokens, self.mask = torch.randn(shape, device=plan.device, generator=g), text_mask(plan)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(prompts)
        return self.tokens.expand(n, -1, -1), self.mask.expand(n, -1)


def measure_served(plan: Plan, dit: MMDiT, vae: CausalVAE) -> dict[str, Any]:
    """What the engine worker runs for one request (the scheduler aside): Pipeline.generate on the modules prepared
    with the server's RunOptions, each uint8 chunk into the fMP4 encoder on the host."""
    from aptserve.engines.loading import LoadedModel
    from aptserve.engines.pipeline import Pipeline

    try:
        from aptserve.media.encoder import FragmentedMP4Encoder
    except ImportError:  # the GPU machine may lack imageio-ffmpeg: the row then stops at host uint8 chunks
        FragmentedMP4Encoder = None
    pipeline = Pipeline(LoadedModel(plan.model, dit, vae, "random weights"), FixedText(plan), plan.device, plan.dtype)
    request = pipeline.request("served", 0, f"{plan.width}x{plan.height}", (plan.frames - 1) / plan.model.fps)
    first_piece: list[float] = []

    def run() -> None:
        start, pieces = time.perf_counter(), []
        encoder = FragmentedMP4Encoder(plan.width, plan.height, plan.model.fps) if FragmentedMP4Encoder else None
        for chunk in pipeline.generate(request):
            if encoder is not None:
                pieces += encoder.write(chunk.frames[0])
            if len(first_piece) < len(pieces) or (encoder is None and chunk.index == 0):
                first_piece.append(time.perf_counter() - start)
        if encoder is not None:
            encoder.close()

    seconds, _, _ = time_call(run, plan.device, plan.warmup, plan.repeats)
    clip_s = (request.frames - 1) / plan.model.fps
    path = "fMP4 encoder" if FragmentedMP4Encoder else "no imageio-ffmpeg: uint8 chunks only"
    note = (
        f"{request.width}x{request.height}x{request.frames}, attention {dit.attention_impl}, {path}; first piece "
        f"after {statistics.median(first_piece):.3f} s; realtime factor {clip_s / seconds:.2f}"
    )
    return {"seconds": seconds, "note": note}


def served_row(report: Report, state: dict[str, Any]) -> None:
    dit, vae = state.get("dit_fast"), state.get("vae:vae wan-light channels-last compiled")
    skip = None if dit is not None and vae is not None else "needs the compiled DiT and light VAE rows"
    report.run("served fast path", lambda: measure_served(report.plan, dit, vae), skip)


def peak_memory_row(report: Report) -> None:
    rows = [r.peak_gib for r in report.rows.values() if r.peak_gib is not None]

    def measure() -> dict[str, Any]:
        if report.plan.device == "cuda":
            return {"peak_gib": max(rows) if rows else None, "note": "max over rows of torch.cuda.max_memory_allocated"}
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB
        return {"peak_gib": rss_gib, "note": "CPU: process peak resident set size"}

    report.run("peak memory", measure)


# ---------------------------------------------------------------------------------------------------------------------
# Wan2.1


def measure_wan_vae(plan: Plan) -> dict[str, Any]:
    vae = build_vae(plan, plan.wan.vae)
    latent = vae_latent(plan, plan.wan.vae, plan.wan.latent)
    with torch.inference_mode():
        seconds, first, _ = time_call(lambda: decode_chunked(vae, latent), plan.device, plan.warmup, plan.repeats)
    shape = "x".join(str(s) for s in latent.shape[2:])
    return {"seconds": seconds, "note": f"{plan.wan.clip}, latent {shape}; first call {first:.2f} s"}


def wan_section(report: Report) -> None:
    """The Wan2.1 rows, with apt-8b already freed: the VAE decode, the eager generator rows, then the compiled one
    on the eager FP8 row's model (its attention Triton where Triton runs)."""
    plan, state = report.plan, {}
    report.run("wan2.1 vae chunked", lambda: measure_wan_vae(plan))
    _free_memory(plan.device)
    no_triton = triton_skip(plan, fp8=False)
    fast = {"attention": "sdpa" if no_triton else "triton", "fp8": True}
    for name, options, skip in (
        ("wan2.1 eager sdpa", {"attention": "sdpa"}, None),
        ("wan2.1 eager triton", {"attention": "triton"}, no_triton),
        ("wan2.1 eager fp8 linears", fast, None),
    ):
        report.run(name, lambda o=options: measure_dit(plan, state, "eager", "wan", **o), skip)
    skip = None if "wan" in state else "no generator (an earlier Wan2.1 row failed)"
    compiled = "wan2.1 compiled fp8 linears"
    report.run(compiled, lambda: measure_dit(plan, state, "compiled", "wan", **fast), skip, plan.compile_reserve_s)
    state.clear()
    _free_memory(plan.device)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes (what CI runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    parser.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this")
    parser.add_argument("--only", default="", help="comma-separated substrings of the row names to run")
    parser.add_argument("--compiler", default=None, help="torch.compile backend (default: inductor; tiny: aot_eager)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (on a busy machine 1 beats 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU version")
    if args.threads:
        torch.set_num_threads(args.threads)
    compiler = args.compiler or ("aot_eager" if args.tiny else "inductor")
    plan = tiny_plan(compiler) if args.tiny else full_plan(compiler)
    torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithm per VAE shape, as a server would
    budget = args.budget_s if args.budget_s is not None else (100.0 if args.tiny else 420.0)
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    rows = {name: Row(name, what, reason="not run") for name, what in ROWS.items()}
    report = Report(plan, budget, only, args.json, machine_info(plan), rows)
    run_all(report)
    print_table(report)
    report.write_json()
    return report


def run_all(report: Report) -> None:
    """Cheap rows first, compiled rows last; each section frees what the next does not need."""
    plan, state = report.plan, {}
    report.run("matmul", lambda: measure_matmul(plan))
    report.peak_tflops = report.rows["matmul"].tflops
    attention_section(report)
    dit_section(report, state)
    vae_section(report, state, compiled=False)
    e2e_row(report, state, "e2e eager fast path", "vae:vae wan-light")
    state.pop("vae:vae wan-light", None)
    dit_compiled_row(report, state)
    vae_section(report, state, compiled=True)
    e2e_row(report, state, "e2e compiled fast path", "vae:vae wan-light channels-last compiled")
    served_row(report, state)
    state.clear()
    _free_memory(plan.device)
    wan_section(report)
    peak_memory_row(report)


if __name__ == "__main__":
    main()
