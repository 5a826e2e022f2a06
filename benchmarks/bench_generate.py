"""Generation: tokens per second of sampling, ours (``ct``: cached memory K/V, the decode
kernels, each sampled token's step a CUDA graph replay) vs compressive-transformer-pytorch
0.4.0's ``AutoregressiveWrapper.generate`` (``ctpytorch_0.4.0``), at the d512-L8
configuration (untrained weights, bf16 autocast).

Rows (benchmarks/results/generate.csv): op ``generate``, mode ``fwd``, shape
``d512-L8-B{B}-P{prompt}-T{tokens}``; ``ms`` = wall time of the whole call (prompt and, for
ours, the capture of the step's graphs included, timed end to end for both) divided by the
number of sampled steps; tokens/s = B * 1000 / ms.
"""
import time

import torch

from benchmarks.bench_train import SEED_PROVIDER, seed_model
from benchmarks.harness import append_rows, environment, failed_row
from compressive_transformer import CompressiveTransformer, preset
from compressive_transformer.generate import generate

CONFIG = "d512-L8"
BATCHES = (1, 16)
PROMPT, TOKENS = 512, 512


def ct_generate(config):
    model = CompressiveTransformer(config).cuda().eval()
    return lambda prompt, length: generate(model, prompt, length, temperature=1.0)


def seed_generate(config):
    from compressive_transformer_pytorch import AutoregressiveWrapper
    wrapper = AutoregressiveWrapper(seed_model(config).eval())

    def run(prompt, length):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return wrapper.generate(prompt, length)
    return run


def run():
    if not torch.cuda.is_available():
        print("bench_generate: no GPU, skipped")
        return []
    config, _ = preset(CONFIG, dropout=0.0)
    rows = []
    for batch in BATCHES:
        shape = f"{CONFIG}-B{batch}-P{PROMPT}-T{TOKENS}"
        prompt = torch.randint(0, config.vocab_size, (batch, PROMPT), device="cuda")
        for provider, make in (("ct", ct_generate), (SEED_PROVIDER, seed_generate)):
            try:
                sample = make(config)
                sample(prompt, 4)  # warm-up: every kernel compiled, allocator filled
                torch.cuda.synchronize()
                start = time.perf_counter()
                sample(prompt, TOKENS)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3 / TOKENS
            except Exception as error:  # seed not installed, out of memory: report, go on
                failed_row("generate", shape, provider, "fwd", error)
                continue
            row = {"op": "generate", "shape": shape, "provider": provider, "mode": "fwd",
                   "ms": f"{ms:.4f}", "tflops": "", "gbps": "", "peak_extra_mib": ""}
            row.update(environment())
            rows.append(row)
            print(f"generate {shape:28s} {provider:16s} {ms:8.3f} ms/step "
                  f"{batch * 1e3 / ms:10,.0f} tokens/s", flush=True)
            del sample
            torch.cuda.empty_cache()
    append_rows(rows, "generate.csv")
    return rows


if __name__ == "__main__":
    run()
