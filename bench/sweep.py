"""Run the providers over a list of cases and return one row per (case, provider, mode)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fused_lora.saved_tensors import saved_tensor_bytes

from . import timing
from .providers import Weights, build, frozen_bytes, trainable_parameters
from .report import backend_used

BASELINE = "linear"


@dataclass(frozen=True)
class Case:
    K: int
    N: int
    T: int
    r: int
    p: float
    dtype: str

    def flops(self, mode: str) -> float:
        """FLOPs of the LoRA layer (the same count for every provider, the frozen linear included)."""
        base, lora = 2 * self.T * self.K * self.N, 2 * self.T * self.r * (self.K + self.N)
        return {"fwd": base + lora, "bwd": base + 2 * lora, "fwd+bwd": 2 * base + 3 * lora}[mode]

    @property
    def label(self) -> str:
        return f"{self.K}->{self.N} T={self.T} r={self.r} p={self.p}"


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(case: Case, device, count: int):
    gen = torch.Generator(device=device).manual_seed(1)
    dtype = DTYPES[case.dtype]
    return [(torch.randn(case.T, case.K, generator=gen, device=device).to(dtype).requires_grad_(True),
             torch.randn(case.T, case.N, generator=gen, device=device).to(dtype)) for _ in range(count)]


def _status_of(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"failed: {type(error).__name__}: {text}"[:160]


def run_case(case: Case, providers, device, repeats: int, min_seconds: float = 0.0):
    """Rows (dicts) for one case: every provider, every mode, or a row saying why not."""
    dtype = DTYPES[case.dtype]
    adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weights = Weights.random(case.K, case.N, case.r, dtype, adapter_dtype, device)
    inputs = _inputs(case, device, count=2 if device.type == "cpu" else 4)
    x0, dy0 = inputs[0]

    contestants, status, backends, saved, peaks, frozen = {}, {}, {}, {}, {}, {}
    for name in [BASELINE] + [p for p in providers if p != BASELINE]:
        try:
            module, backend = build(name, weights, case.r, case.p)
            params = trainable_parameters(module)
            timing.cpu_step(module, x0, dy0, params)  # first call: compiles, autotunes, checks it runs
        except NotImplementedError as why:
            status[name] = f"n/a: {why}"
            continue
        except Exception as error:  # a provider that fails on this machine gets a row that says so
            status[name] = _status_of(error)
            continue
        contestants[name] = (module, params)
        frozen[name] = frozen_bytes(module)
        backends[name] = backend_used(backend, case.K, case.N, case.T, case.r, case.p)
        status[name] = "ok"
        try:
            saved[name] = saved_tensor_bytes(lambda: module(x0), exclude=module.parameters())
        except Exception:
            saved[name] = None
        if device.type == "cuda":
            peaks[name] = timing.cuda_peak_bytes(module, x0, dy0, params)

    if device.type == "cpu":
        times = timing.time_cpu_interleaved(contestants, inputs, repeats, min_seconds=min_seconds)
    else:
        times = timing.time_cuda_interleaved(contestants, inputs, repeats)
    summaries = {name: {m: timing.summarize(v) for m, v in modes.items()} for name, modes in times.items()}
    ratios = timing.paired_ratios(times, BASELINE) if BASELINE in times else {}

    rows = []
    for name in [BASELINE] + [p for p in providers if p != BASELINE]:
        for mode in timing.MODES:
            row = dict(asdict(case), provider=name, backend=backends.get(name, ""), mode=mode,
                       status=status.get(name, "not run"))
            if name in summaries:
                med, p20, p80 = summaries[name][mode]
                row.update(median_ms=med, p20_ms=p20, p80_ms=p80,
                           ratio_to_linear=ratios.get(name, {}).get(mode, (None,))[0],
                           ratio_p20=ratios.get(name, {}).get(mode, (None, None, None))[1],
                           ratio_p80=ratios.get(name, {}).get(mode, (None, None, None))[2],
                           tflops=case.flops(mode) / (med * 1e-3) / 1e12,
                           saved_bytes=saved.get(name), peak_bytes=peaks.get(name), weight_bytes=frozen.get(name))
            rows.append(row)
    return rows
