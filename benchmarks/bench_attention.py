"""Compressive attention: ct_triton vs naive einsum, SDPA flash and compiled FlexAttention.

Rows (benchmarks/results/attention.csv):
  op ``attention``: the four DESIGN.md section 3 shapes, providers ct_triton, naive
      (reference einsum), sdpa_flash (flash backend, causal_lower_right on concatenated
      K/V), flex (compiled flex_attention with a bottom-right causal block mask).
  op ``relpos_attention``: Transformer-XL relative positions on pg19-like and enwik8-like,
      providers ct_triton, naive (reference gather), flex (position scores materialized as
      [B, H, n, L] and added in score_mod), sdpa_bias (a float bias [B, H, n, L]);
      ct_triton_stored is ct_triton with store_score_grads=True (its backward keeps the
      [B, H, n, L] score gradients instead of recomputing the scores), ct_triton_kept also
      with store_position_scores=True (the forward keeps its position scores for it).
  ct_triton (and _stored, _kept) run the Triton kernels only; ct_cuda (and _stored, _kept)
  on Hopper is what the package runs there by default: the sm_90 forward of
  csrc/attention_sm90.cu (with relative positions too) and, without relative positions at head
  dim 128, its sm_90 backward (the Triton backward otherwise).
Modes fwd (no grad) and fwd+bwd (gradients for q, k, v, both memories and r, u, v).
FLOPs = 4 B H D (n (m + cm) + n (n + 1) / 2), x3.5 for fwd+bwd (QK and PV only).
Peers get the concatenated K/V: the torch.cat is part of their time, as for a user.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import ct_kernels
from benchmarks import harness
from ct_kernels import dispatch, reference, testing
from ct_kernels.ops import attention

# name -> (B, H, n, m, cm, D)
SHAPES = {
    "pg19-like": (16, 8, 512, 512, 1024, 128),
    "enwik8-like": (8, 8, 768, 768, 1152, 128),
    "d64": (16, 16, 512, 512, 1024, 64),
    "long": (4, 8, 2048, 2048, 4096, 128),
}
RELPOS_SHAPES = ("pg19-like", "enwik8-like")
# the tuning sweep's shapes: the benchmark's, and one for the head dim none of them has
TUNE_SHAPES = {**SHAPES, "d256": (8, 8, 512, 512, 1024, 256)}
CPU_SHAPES = {"cpu-small": (1, 2, 24, 16, 32, 16)}
CSV = "attention.csv"
# also timed as CUDA graph replays (provider "<name>-graph"): GPU time without the Python,
# autograd and launch work per call, which a training step overlaps with earlier GPU work
GRAPH_PROVIDERS = ("ct_triton", "ct_cuda", "ct_triton_stored", "ct_cuda_stored", "ct_triton_kept",
                   "ct_cuda_kept", "sdpa_flash",
                   "flex")


@contextlib.contextmanager
def triton_only():
    """The Triton passes even where the sm_90 kernels apply (provider ct_triton)."""
    saved = attention.SM90_FORWARD, attention.SM90_BACKWARD
    attention.SM90_FORWARD = attention.SM90_BACKWARD = False
    try:
        yield
    finally:
        attention.SM90_FORWARD, attention.SM90_BACKWARD = saved


def sm90_available():
    return attention._sm90_loaded() and dispatch.on_sm90()


def attention_flops(B, H, n, m, cm, D):
    return 4 * B * H * D * (n * (m + cm) + n * (n + 1) / 2)


def make_inputs(shape, dtype, device, rel_pos):
    B, H, n, m, cm, D = shape
    args = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=dtype, device=device,
                                           rel_pos=rel_pos, extra_rows=0, requires_grad=True)
    return args


def _concatenated(args):
    """[B, H, L, D] keys and values as a user would build them for SDPA / FlexAttention."""
    keys = [args[k] for k in ("cmem_k", "mem_k", "k") if k in args]
    values = [args[k] for k in ("cmem_v", "mem_v", "v") if k in args]
    return torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1).transpose(1, 2)


def providers(args, rel_pos, device):
    """name -> forward callable returning [B, n, H, D]."""
    q = args["q"]
    B, n, H, D = q.shape
    L = n + sum(args[k].shape[1] for k in ("mem_k", "cmem_k") if k in args)
    scale = D ** -0.5
    fns = {
        "ct_triton": lambda: ct_kernels.compressive_attention(**args, backend="triton"),
        "naive": lambda: reference.compressive_attention(**args),
    }
    if device != "cuda":
        return fns
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(lambda b, h, i, j: j <= i + (L - n), None, None, n, L,
                                   device=device)
    if not rel_pos:
        def sdpa_flash():
            keys, values = _concatenated(args)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                                     attn_mask=causal_lower_right(n, L))
            return out.transpose(1, 2)

        def flex_masked():
            keys, values = _concatenated(args)
            return flex(q.transpose(1, 2), keys, values, block_mask=block_mask).transpose(1, 2)

        fns.update(sdpa_flash=sdpa_flash, flex=flex_masked)
        if D in attention.SM90_FORWARD_HEAD_DIMS and sm90_available():
            fns["ct_cuda"] = fns["ct_triton"]  # the same call, outside triton_only()
        return fns

    r, u, v_bias = args["rel_pos"]

    def position_scores():  # the [B, H, n, L] matrix a user materializes
        return reference.relative_position_scores(q + v_bias, r, n, L) * scale

    def flex_positions():
        keys, values = _concatenated(args)
        pos = position_scores()

        def add_position(score, b, h, i, j):
            return score + pos[b, h, i, j]
        return flex((q + u).transpose(1, 2), keys, values, score_mod=add_position,
                     block_mask=block_mask).transpose(1, 2)

    def sdpa_bias():
        keys, values = _concatenated(args)
        causal = torch.ones(n, L, dtype=torch.bool, device=device).tril(L - n)
        bias = position_scores().masked_fill(~causal, float("-inf"))
        out = F.scaled_dot_product_attention((q + u).transpose(1, 2), keys, values,
                                             attn_mask=bias)
        return out.transpose(1, 2)

    fns.update(flex=flex_positions, sdpa_bias=sdpa_bias, ct_triton_stored=lambda: (
        ct_kernels.compressive_attention(**args, backend="triton", store_score_grads=True)),
        ct_triton_kept=lambda: ct_kernels.compressive_attention(
            **args, backend="triton", store_score_grads=True, store_position_scores=True))
    if D in attention.SM90_FORWARD_HEAD_DIMS and q.dtype == torch.bfloat16 and sm90_available():
        # the same calls, outside triton_only()
        fns.update(ct_cuda=fns["ct_triton"], ct_cuda_stored=fns["ct_triton_stored"],
                   ct_cuda_kept=fns["ct_triton_kept"])
    return fns


def leaves(args):
    """Every input that gets a gradient (q, k, v, both memories, r, u, v)."""
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return tensors + list(args.get("rel_pos") or ())


def cases(shapes, dtype, device, rel_pos):
    """(shape name, provider, mode, callable, flops) for every benchmark case."""
    for name, shape in shapes.items():
        args = make_inputs(shape, dtype, device, rel_pos)
        grad = torch.randn_like(args["q"])
        flops = attention_flops(*shape)
        for provider, fwd in providers(args, rel_pos, device).items():
            context = triton_only if provider.startswith("ct_triton") else contextlib.nullcontext

            def forward(fwd=fwd, context=context):
                with torch.no_grad(), context():
                    return fwd()

            def forward_backward(fwd=fwd, context=context):  # gradients returned, not in .grad
                with context():
                    torch.autograd.grad(fwd(), leaves(args), grad)
            yield name, provider, "fwd", forward, flops
            yield name, provider, "fwd+bwd", forward_backward, 3.5 * flops


def run(ops=("attention", "relpos_attention")):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one compiled flex_attention per shape, mode and score_mod
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = 1024
    shapes = SHAPES if device == "cuda" else CPU_SHAPES
    rows = []
    for op, rel_pos, names in (("attention", False, shapes),
                               ("relpos_attention", True,
                                {k: v for k, v in shapes.items() if k in RELPOS_SHAPES or device != "cuda"})):
        if op not in ops:
            continue
        for name, provider, mode, fn, flops in cases(names, torch.bfloat16, device, rel_pos):
            labels = [provider]
            if device == "cuda" and provider in GRAPH_PROVIDERS:
                labels.append(f"{provider}-graph")
            for label in labels:
                graph = label.endswith("-graph")
                try:
                    rows.append(harness.measure(op, name, label, mode,
                                                harness.graphed(fn) if graph else fn,
                                                flops=flops, memory=not graph))
                    harness.append_rows(rows[-1:], CSV)  # row by row: a cut-short run keeps its rows
                except Exception as error:  # e.g. out of memory, unsupported by a peer
                    harness.failed_row(op, name, label, mode, error)
            if device == "cuda":
                torch.cuda.empty_cache()
    for op in ops:
        harness.plot(rows, op, filename=f"{op}.png")
    return rows


# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per (pass, head dim) for ``--tune``. The
# one-stage candidates (less shared memory, more programs per SM) follow the relative-position
# tiles' outcome (benchmarks/NOTES.md, Attention section 12).
TUNE_CANDIDATES = {
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2),
                   (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 1), (128, 64, 8, 1)],
    ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                  (64, 128, 4, 3), (64, 64, 4, 1), (128, 64, 4, 1)],
    ("dq", 128): [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
                  (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 1), (128, 64, 8, 1)],
    ("dq", 64): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3),
                 (64, 32, 4, 3), (64, 64, 4, 1), (128, 64, 4, 1)],
    ("dkdv", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3),
                    (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (128, 64, 8, 2),
                    (32, 64, 4, 1), (64, 128, 8, 1)],
    ("dkdv", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 3),
                   (32, 128, 4, 2), (32, 64, 4, 3), (128, 64, 8, 2), (32, 128, 4, 1)],
    ("fwd_rel", 128): [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2),
                       (32, 128, 4, 2), (64, 64, 4, 1), (64, 64, 8, 1), (32, 64, 4, 3),
                       (32, 64, 8, 2)],
    ("fwd_rel", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2),
                      (64, 128, 8, 2), (64, 64, 4, 1)],
    ("dq_rel", 128): [(32, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2),
                      (64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 8, 1), (32, 64, 4, 1),
                      (32, 64, 4, 3), (64, 64, 4, 1)],
    ("dq_rel", 64): [(64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 4, 2),
                     (64, 64, 8, 2), (64, 64, 4, 1)],
    ("dkdv_rel", 128): [(64, 64, 8, 1), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2),
                        (64, 32, 4, 2), (32, 64, 8, 2), (64, 64, 4, 1), (32, 64, 4, 1)],
    ("dkdv_rel", 64): [(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2),
                       (32, 128, 4, 2)],
    ("fwd", 256): [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2),
                   (64, 64, 4, 1)],
    ("dq", 256): [(64, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2),
                  (64, 32, 8, 1)],
    ("dkdv", 256): [(64, 32, 8, 1), (32, 32, 8, 1), (32, 32, 4, 1), (64, 32, 8, 2),
                    (32, 64, 8, 1)],
    ("fwd_rel", 256): [(16, 32, 4, 1), (16, 16, 4, 1), (32, 32, 4, 1), (32, 32, 8, 1),
                       (16, 32, 4, 2)],
    ("dq_rel", 256): [(16, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1), (32, 32, 8, 1),
                      (32, 32, 4, 1)],
    ("dkdv_rel", 256): [(32, 16, 4, 1), (16, 32, 8, 1), (32, 32, 4, 1), (16, 16, 4, 1),
                        (32, 32, 8, 1)],
    ("dq_stored_rel", 128): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2),
                             (64, 128, 4, 2), (128, 32, 8, 3), (64, 64, 8, 2)],
    ("dq_stored_rel", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2),
                            (64, 128, 4, 2)],
    ("dkdv_stored_rel", 128): [(32, 64, 4, 1), (64, 64, 4, 1), (32, 64, 4, 2), (64, 64, 8, 1),
                               (32, 128, 4, 1)],
    ("dkdv_stored_rel", 64): [(64, 64, 4, 1), (32, 64, 4, 1), (64, 64, 4, 2), (32, 128, 4, 1)],
    # (reading the forward's position scores, the pass is the plain dK/dV pass plus loads and
    # stores: its pipelined tiles are candidates too)
    ("dkdv_kept_rel", 128): [(32, 64, 4, 1), (64, 64, 4, 1), (32, 64, 4, 2), (64, 64, 8, 1),
                             (32, 128, 4, 1), (64, 64, 4, 2), (32, 128, 4, 2), (32, 64, 4, 3)],
    ("dkdv_kept_rel", 64): [(64, 64, 4, 1), (32, 64, 4, 1), (64, 64, 4, 2), (32, 128, 4, 1),
                            (32, 128, 4, 2), (32, 128, 4, 3)],
}


def pass_launchers(args):
    """pass name -> callable that launches only that pass's kernel on prepared inputs
    (forward output, LSE, delta computed once at the current configuration)."""
    r, u, v_bias = args.get("rel_pos") or (None, None, None)
    tensors = {k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in args.items()
               if k != "rel_pos"}
    q = tensors["q"]
    call = attention._Call(q, tensors["k"], tensors["v"], tensors.get("mem_k"),
                           tensors.get("mem_v"), tensors.get("cmem_k"), tensors.get("cmem_v"),
                           None, None, None, *(None if t is None else t.detach() for t in (r, u, v_bias)),
                           True, q.shape[-1] ** -0.5)
    out, lse = torch.empty_like(q), q.new_empty(call.B, call.H, call.n, dtype=torch.float32)
    attention._launch_fwd(call, out, lse)
    grad_out = torch.randn_like(q)
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    rel_grads = ((torch.zeros(r.shape, device=q.device), torch.zeros(r.shape[:2], device=q.device),
                  torch.zeros(u.shape, device=q.device)) if r is not None else None)
    attention._launch_dq(call, out, grad_out, lse, delta, dq, rel_grads)
    grads = [torch.empty_like(tensors[k]) if tensors.get(k) is not None else dq
             for k in ("k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v")]
    scratch_out, scratch_lse, scratch_delta = torch.empty_like(out), torch.empty_like(lse), torch.empty_like(delta)
    launchers = {"fwd": lambda: attention._launch_fwd(call, scratch_out, scratch_lse),
                 "dq": lambda: attention._launch_dq(call, out, grad_out, lse, scratch_delta, dq,
                                                    rel_grads),
                 "dkdv": lambda: attention._launch_dkdv(call, grad_out, lse, delta, grads)}
    if r is not None:  # the backward from stored score gradients (store_score_grads=True)
        score_grads = (q.new_empty(call.B * call.H, call.n, call.score_grad_columns[0]),
                       q.new_empty(call.B * call.H, call.n, call.score_grad_columns[0]))
        attention._launch_dkdv(call, grad_out, lse, delta, grads, score_grads)
        launchers["dkdv_stored"] = lambda: attention._launch_dkdv(call, grad_out, lse, delta,
                                                                  grads, score_grads)
        # with the position scores that the forward kept (store_position_scores=True): the
        # pass reads them and overwrites them with the score gradients (timed again, it reads
        # those, which costs the same)
        pos_scores = call.pos_scores()
        attention._launch_fwd(call, scratch_out, scratch_lse, pos_scores)
        kept = (pos_scores, score_grads[1])
        launchers["dkdv_kept"] = lambda: attention._launch_dkdv(call, grad_out, lse, delta,
                                                                grads, kept, True)
        launchers["dq_stored"] = lambda: attention._launch_dq_stored(call, score_grads, dq,
                                                                     rel_grads)
    return launchers


def _tune_jobs(passes=None):
    """(config key, candidate, shape names, relative positions) of every tuning case (of the
    named passes only, if given)."""
    for (pass_name, head_dim), candidates in TUNE_CANDIDATES.items():
        if passes and pass_name not in passes:
            continue
        rel_pos = pass_name.endswith("_rel")
        names = [name for name, shape in TUNE_SHAPES.items() if shape[-1] == head_dim]
        if rel_pos:  # the relative-position shapes, or any shape of that head dim
            names = [name for name in names if name in RELPOS_SHAPES] or names
        for config in candidates:
            yield (pass_name, head_dim), config, names, rel_pos


def _compile_job(job):
    """Compile one candidate into Triton's on-disk cache (run in a worker process)."""
    key, config, names, rel_pos = job
    current = attention.GPU_CONFIGS[key]  # a worker runs several jobs: restore it after
    attention.GPU_CONFIGS[key] = config
    try:
        launch = pass_launchers(make_inputs(TUNE_SHAPES[names[0]], torch.bfloat16, "cuda", rel_pos))
        launch[key[0].replace("_rel", "")]()
        torch.cuda.synchronize()
        return None
    except Exception as error:  # e.g. out of shared memory: reported by the timing pass too
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    finally:
        attention.GPU_CONFIGS[key] = current


def tune(passes=None, workers: int = 8):
    """Time every candidate of every pass, kernel only, on every shape of its head dim;
    print the table and keep the candidate with the best geometric mean over the shapes in
    ``attention.GPU_CONFIGS`` for the rest of the process. Candidates are compiled first
    by ``workers`` processes in parallel (Triton's cache then serves the timing process); a
    candidate that fails there (out of resources, or a fault) is reported and not timed."""
    import concurrent.futures
    import math
    import multiprocessing
    jobs = list(_tune_jobs(passes))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        retry = [job for job, error in zip(jobs, pool.map(_compile_job, jobs)) if error]
    # a candidate that faults leaves its worker's CUDA context unusable for the worker's later
    # jobs: each failure runs again in a process of its own, and what fails there is skipped
    failed = set()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn, max_tasks_per_child=1) as pool:
        for job, error in zip(retry, pool.map(_compile_job, retry)):
            if error:
                print(f"tune compile {job[0]} {job[1]}: {error}", flush=True)
                failed.add((job[0], job[1]))
    inputs = {}
    timings = {}
    for key, config, names, rel_pos in jobs:
        if (key, config) in failed:  # not launched again here: a fault would end this process
            timings.setdefault(key, {})[config] = {name: float("inf") for name in names}
            continue
        current = attention.GPU_CONFIGS[key]
        attention.GPU_CONFIGS[key] = config
        for name in names:
            if (name, rel_pos) not in inputs:
                inputs[(name, rel_pos)] = pass_launchers(
                    make_inputs(TUNE_SHAPES[name], torch.bfloat16, "cuda", rel_pos))
            try:
                ms = harness.time_ms(inputs[(name, rel_pos)][key[0].replace("_rel", "")], rep_ms=100)
            except Exception:  # noqa: BLE001  (out of resources: not a candidate)
                ms = float("inf")
            timings.setdefault(key, {}).setdefault(config, {})[name] = ms
        attention.GPU_CONFIGS[key] = current
    for key, per_config in timings.items():
        names = list(next(iter(per_config.values())))
        print(f"tune {key}: ms per shape " + " | ".join(names), flush=True)
        score = {c: math.exp(sum(math.log(t[n]) for n in names) / len(names)) for c, t in per_config.items()}
        for config, per_shape in per_config.items():
            print(f"  {str(config):18s} " + " | ".join(f"{per_shape[n]:.4f}" for n in names)
                  + f"  geomean {score[config]:.4f}", flush=True)
        best = min(score, key=score.get)
        if math.isfinite(score[best]):
            attention.GPU_CONFIGS[key] = best
        print(f"  -> {best}; per shape best: "
              + ", ".join(f"{n} {min(per_config, key=lambda c: per_config[c][n])}" for n in names), flush=True)


def sweep_block_windows(windows=(1, 4, 8, 16, 32, 64, 0), repeats: int = 3):
    """The sm_90 kernels alone (CUDA-graph replays) at each block-order window (batch-heads
    per window, csrc/sm90.cuh block_work; 0: the kernels' own choice), the windows interleaved
    ``repeats`` times; prints the median ms per window: the forward on every shape (and with
    relative positions on theirs), the backward at head dim 128."""
    import statistics
    ops = torch.ops.ct_kernels
    for name, (B, H, n, m, cm, D) in SHAPES.items():
        for rel_pos in (False, True):
            if rel_pos and name not in RELPOS_SHAPES:
                continue
            bf16 = dict(device="cuda", dtype=torch.bfloat16)
            q, k, v, grad_out = (torch.randn(B, n, H, D, **bf16) for _ in range(4))
            mem_k, mem_v = (torch.randn(B, m, H, D, **bf16) for _ in range(2))
            cmem_k, cmem_v = (torch.randn(B, cm, H, D, **bf16) for _ in range(2))
            L = n + m + cm
            rel = (dict(rel_r=torch.randn(H, L, D, **bf16), rel_u=torch.randn(H, D, **bf16),
                        rel_v=torch.randn(H, D, **bf16))
                   if rel_pos else dict(rel_r=None, rel_u=None, rel_v=None))
            sources = dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v, cmem_k=cmem_k, cmem_v=cmem_v,
                           mem_lens=None, cmem_lens=None)
            out, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda")
            passes = {"fwd": lambda w: ops.attention_fwd_sm90(
                **sources, **rel, rel_scores=None, causal=True, scale=D ** -0.5, out=out, lse=lse,
                block_window=w)}
            if D in attention.SM90_BACKWARD_HEAD_DIMS and not rel_pos:
                passes["fwd"](0)
                grads = [torch.empty_like(t) for t in (q, k, v, mem_k, mem_v, cmem_k, cmem_v)]
                workspace = attention.sm90_backward_workspace(B, H, n, "cuda")
                passes["bwd"] = lambda w: ops.attention_bwd_sm90(
                    grad_out, **sources, out=out, lse=lse, causal=True, scale=D ** -0.5,
                    dq=grads[0], dk=grads[1], dv=grads[2], dmem_k=grads[3], dmem_v=grads[4],
                    dcmem_k=grads[5], dcmem_v=grads[6], workspace=workspace, block_window=w)
            for pass_name, launch in passes.items():
                replays = {w: harness.graphed(lambda w=w: launch(w)) for w in windows}
                samples = {w: [] for w in windows}
                for _ in range(repeats):
                    for w in windows:
                        samples[w].append(harness.time_ms(replays[w], rep_ms=150))
                label = f"{name}{' rel' if rel_pos else ''} {pass_name}"
                print(f"block windows {label:22s} " + " | ".join(
                    f"{w or 'auto'}: {statistics.median(samples[w]):.4f}" for w in windows), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true",
                        help="first re-measure the launch configurations (GPU)")
    parser.add_argument("--tune-only", action="store_true", help="re-measure them, nothing else")
    parser.add_argument("--passes", nargs="*", help="tune only these passes (e.g. fwd dq_rel)")
    parser.add_argument("--block-windows", action="store_true",
                        help="time the sm_90 kernels' block-order windows, nothing else (GPU)")
    parser.add_argument("--ops", nargs="*", choices=("attention", "relpos_attention"),
                        default=("attention", "relpos_attention"), help="benchmark only these ops")
    options = parser.parse_args()
    if options.block_windows:
        sweep_block_windows()
    if options.tune or options.tune_only:
        tune(options.passes)
    if not (options.tune_only or options.block_windows):
        run(options.ops)
