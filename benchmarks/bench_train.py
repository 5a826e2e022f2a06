"""train_step: one optimizer step over one segment with full memories (bf16 autocast, Adam,
gradient clipping), ours (``ct``; ``ct_compiled``: the model under torch.compile; ``_graph``:
the step replayed as a CUDA graph, ``train --cuda-graph``; ``_kept``: with
``store_position_scores``, ``train --store-position-scores``) vs the PyPI
package compressive-transformer-pytorch 0.4.0 (``ctpytorch_0.4.0``) at the two configurations
of DESIGN.md §3. Same width, layers, heads, n, m, cm, rate and batch; both without dropout.
tokens/s = B * n / (ms / 1e3).
Rows go to benchmarks/results/train.csv."""
import math

import torch
import torch.nn.functional as F

from benchmarks.harness import append_rows, failed_row, graph_pool_mib, measure, plot
from compressive_transformer import CompressiveTransformer, preset
from compressive_transformer.config import TrainConfig
from compressive_transformer.train import CudaGraphTrainStep, make_optimizer, train_step

CONFIGS = ("d512-L8", "d1024-L4")
SEED_PROVIDER = "ctpytorch_0.4.0"


CLIP = 0.1


def _optimizer_step(model, optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()


def ct_step(name, tokens, compiled=False, graph=False, kept=False):
    """One training step of our model, as ``compressive_transformer.train`` runs it
    (``compiled``: under torch.compile, which removes most of the per-layer host work;
    ``graph``: captured once as a CUDA graph and replayed; ``kept``: each layer's attention
    forward keeps its position scores for the backward); memories carry over from step to
    step."""
    config, _ = preset(name, dropout=0.0, store_position_scores=kept)
    model = CompressiveTransformer(config).cuda()
    if compiled:
        # compiled from scratch, as in a training process: otherwise the code compiled for the
        # previous configuration is recompiled with dynamic (symbolic) sizes, a different graph
        torch._dynamo.reset()
    net = torch.compile(model) if compiled else model
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4, clip=CLIP, cuda_graph=graph), "cuda")
    memories = model.init_memories(tokens.shape[0], dtype=torch.bfloat16)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if graph:
        graphed = CudaGraphTrainStep(net, model, optimizer, memories, inputs.shape[0],
                                     inputs.shape[1], CLIP, amp=True)
        step = lambda: graphed(inputs, targets)  # noqa: E731
        step.pool_mib = graph_pool_mib(graphed.graph)  # its peak memory: the graph's pool
        return step
    return lambda: train_step(net, model, optimizer, memories, inputs, targets, CLIP, amp=True)


def seed_model(config):
    """compressive-transformer-pytorch 0.4.0's model with our configuration's width, layers,
    heads, n, m, cm and rate (its defaults otherwise: GRU-gated residuals, pre-LN, absolute
    learned positions), on the GPU."""
    from compressive_transformer_pytorch import CompressiveTransformer as SeedModel
    return SeedModel(num_tokens=config.vocab_size, dim=config.dim, seq_len=config.seg_len,
                     depth=config.layers, mem_len=config.mem_len, cmem_len=config.cmem_len,
                     cmem_ratio=config.rate, heads=config.heads).cuda()


def seed_step(config, tokens):
    """The same step with compressive-transformer-pytorch 0.4.0."""
    model = seed_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    memories = None

    def step():
        nonlocal memories
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, memories, aux = model(tokens[:, :-1], memories=memories)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        _optimizer_step(model, optimizer, loss + aux)

    return step


def run(configs=CONFIGS, providers=None):
    """Time ``providers`` (default: all) at ``configs``; append their rows."""
    if not torch.cuda.is_available():
        print("bench_train: no GPU, skipped")
        return []
    rows = []
    for name in configs:
        config, train_config = preset(name)
        B, n = train_config.batch, config.seg_len
        tokens = torch.randint(0, config.vocab_size, (B, n + 1), device="cuda")
        fill = math.ceil((config.mem_len + config.cmem_len * config.rate) / n) + 1
        makers = {"ct": lambda: ct_step(name, tokens),
                  "ct_compiled": lambda: ct_step(name, tokens, compiled=True),
                  "ct_graph": lambda: ct_step(name, tokens, graph=True),
                  "ct_compiled_graph": lambda: ct_step(name, tokens, compiled=True, graph=True),
                  "ct_compiled_graph_kept": lambda: ct_step(name, tokens, compiled=True,
                                                            graph=True, kept=True),
                  SEED_PROVIDER: lambda: seed_step(config, tokens)}
        for provider, make in makers.items():
            if providers and provider not in providers:
                continue
            step = None
            try:
                step = make()
                for _ in range(fill):  # memories full from here on
                    step()
                row = measure("train_step", name, provider, "fwd+bwd", step,
                              peak_mib=getattr(step, "pool_mib", None))
                print(f"{'':18s} {name:28s} {provider:16s} {B * n / float(row['ms']) * 1e3:,.0f} tokens/s",
                      flush=True)
                rows.append(row)
            except Exception as error:  # seed not installed, out of memory, kernel failure: report, go on
                failed_row("train_step", name, provider, "fwd+bwd", error)
            del step
            torch.cuda.empty_cache()
    append_rows(rows, "train.csv")
    plot(rows, "train_step", value="ms", filename="train_step.png")
    return rows


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--providers", nargs="*", help="e.g. ct_graph ctpytorch_0.4.0 (default: all)")
    options = parser.parse_args()
    run(options.configs, options.providers)
