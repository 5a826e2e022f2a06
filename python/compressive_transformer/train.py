"""Training: Adam, linear warm-up then cosine decay, gradient clipping, bf16 autocast on GPU,
periodic validation, atomic checkpoints, metrics (JSONL + PNG), DDP under torchrun.

Under ``torchrun --nproc_per_node N`` every process (rank) reads its own slices of the
training text with its own memories; DDP all-reduces gradients; rank 0 writes checkpoints
and logs. A checkpoint resumes under any number of processes: parameters, optimizer state
and step are restored; memories start empty and the text is re-sliced for the new world
size, continuing at the same segment index.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compressive_transformer import checkpoint
from compressive_transformer.config import ModelConfig, TrainConfig
from compressive_transformer.data import SegmentStream, as_tensor, load_documents, split_documents
from compressive_transformer.evaluate import autocast, bits_per_byte
from compressive_transformer.model import CompressiveTransformer

LN2 = math.log(2)


def learning_rate(step, config: TrainConfig):
    """Linear warm-up min_lr -> lr over ``warmup`` steps, then cosine decay to min_lr."""
    if step < config.warmup:
        return config.min_lr + (config.lr - config.min_lr) * step / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def train_step(net, model, optimizer, memories, inputs, targets, clip, amp):
    """One optimiser step over one segment (forward, cross-entropy + compressor loss, backward,
    gradient-norm clipping, optimiser step); advances ``memories`` in place and returns the
    (loss, aux) device scalars. ``net`` is ``model`` or its DDP / compiled wrapper."""
    # no autocast weight cache: a CUDA graph must not keep casts made while it is captured,
    # and its eager warm-up steps run in the same autocast state (a compiled net guards on
    # it and would recompile during capture)
    with autocast(inputs.device, amp, cache_enabled=False):
        logits, memories, aux = net(inputs, memories)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    (loss + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach(), aux.detach()


class CudaGraphTrainStep:
    """``train_step`` captured once as a CUDA graph, then replayed: a step costs the host one
    copy of the tokens and one launch instead of the Python, autograd and kernel-launch work of
    every layer (which bounds small models' eager steps).

    ``step(inputs, targets) -> (loss, aux)``: device scalars, overwritten by the next step.
    Needs a CUDA device, one process (no DDP), a fixed [B, n] segment shape and an Adam created
    with ``capturable=True`` and a tensor learning rate (change it in place: ``set_lr``). The
    graph does not know the memories' fill state (``memories.host_checks`` is switched off):
    the ops always get the lengths, so memories that fill, are full or are reset between steps
    give the same results as eagerly. Capturing first runs ``warmup`` eager steps on a side
    stream (kernel compilation, allocator and library set-up); their effect on the
    parameters, the optimiser state and the memories is undone.
    """

    def __init__(self, net, model, optimizer, memories, batch, seg_len, clip, amp, warmup=3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph step needs the model on a CUDA device, got {device}")
        for group in optimizer.param_groups:
            if not (group.get("capturable") and torch.is_tensor(group["lr"])):
                raise ValueError("a CUDA graph step needs an optimizer created with "
                                 "capturable=True and a tensor lr (e.g. torch.optim.Adam(..., "
                                 "lr=torch.tensor(3e-4, device='cuda'), capturable=True))")
        memories.host_checks = False
        # the graph reads and writes these objects' tensors in place: they must outlive it
        self.net, self.model, self.optimizer, self.memories = net, model, optimizer, memories
        self.inputs = torch.zeros(batch, seg_len, dtype=torch.long, device=device)
        self.targets = torch.zeros_like(self.inputs)
        run = lambda: train_step(net, model, optimizer, memories, self.inputs, self.targets,  # noqa: E731
                                 clip, amp)
        restore = _snapshot(model, optimizer, memories)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        restore()
        optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.aux = run()

    def __call__(self, inputs, targets):
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        return self.loss, self.aux


def _snapshot(model, optimizer, memories):
    """A function that puts parameters, optimiser state and memories back as they are now
    (Adam state that does not exist yet is zeroed: the state of a fresh Adam)."""
    def state_tensors():
        tensors = list(model.parameters()) + list(model.buffers())
        for state in optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
        for memory in memories.layers:
            if memory is not None:
                tensors += [memory.mem, memory.cmem, memory.mem_lens, memory.cmem_lens]
        return tensors + [usage for usage in memories.usage if usage is not None]

    saved = {id(t): (t, t.detach().clone()) for t in state_tensors()}

    def restore():
        with torch.no_grad():
            for t in state_tensors():
                if id(t) in saved:
                    t.copy_(saved[id(t)][1])
                else:
                    t.zero_()
    return restore


def set_lr(optimizer, lr):
    """Set every group's learning rate (in place where it is a tensor, as a CUDA graph reads
    it)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_optimizer(model, config: TrainConfig, device, state=None):
    """Adam as ``config`` asks, with ``state`` (an optimizer state dict) loaded; for a CUDA
    graph step capturable, with a device tensor lr, whatever mode the state was saved in. On
    CUDA the fused implementation (one pass over the parameters and their moments instead of
    a dozen foreach passes); it keeps its step count on the device."""
    graph = config.cuda_graph
    fused = torch.device(device).type == "cuda"
    lr = torch.tensor(config.lr, device=device) if graph else config.lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay,
                                 capturable=graph, fused=fused)
    if state is not None:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            group["capturable"], group["fused"] = graph, fused
            group["lr"] = torch.tensor(float(group["lr"]), device=device) if graph else float(group["lr"])
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if step is not None:  # capturable or fused Adam keeps its step count on the device
                    optimizer.state[p]["step"] = step.to(p.device if graph or fused else "cpu")
    return optimizer


def setup_distributed(device=None):
    """(rank, world, device): initialises the process group under torchrun (NCCL on GPUs,
    gloo on CPUs); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


class MetricsLog:
    """Rank 0's metrics: one JSON object per line in DIR/metrics.jsonl, and DIR/loss.png."""

    def __init__(self, out, enabled):
        self.path = os.path.join(out, "metrics.jsonl")
        self.png = os.path.join(out, "loss.png")
        self.enabled = enabled

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self):
        if not self.enabled or not os.path.exists(self.path):
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = [json.loads(line) for line in open(self.path)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["step"], r["bpc"]) for r in rows if r["split"] == split]
            if points:
                ax.plot(*zip(*points), style, label=f"{split} bpc")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)
        plt.close(fig)


def parameters_identical(model):
    """True when every rank holds exactly rank 0's parameters."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor([int(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def out_of_time(started, max_minutes, device):
    """True once ``max_minutes`` have passed since ``started`` (on any rank: all agree)."""
    if max_minutes is None:
        return False
    late = torch.tensor([float(time.perf_counter() - started > 60 * max_minutes)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def load_data(path, val_fraction, rank):
    """(train, validation) uint8 tensors; rank 0 fetches the default corpus first."""
    if rank != 0 and dist.is_initialized():
        dist.barrier()
    train_bytes, val_bytes = split_documents(load_documents(path), val_fraction)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    return as_tensor(train_bytes), as_tensor(val_bytes)


def train(model_config: ModelConfig, config: TrainConfig, *, data=None, out="runs/train",
          resume=False, device=None, progress=True):
    """Train and return the model (unwrapped). Writes OUT/last.pt, OUT/metrics.jsonl and
    OUT/loss.png (rank 0). ``resume``: continue from OUT/last.pt (its model configuration
    wins over ``model_config``)."""
    rank, world, device = setup_distributed(device)
    if device.type == "cpu" and config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "last.pt")
    state = checkpoint.load(ckpt_path, device) if resume and os.path.exists(ckpt_path) else None
    if resume and state is None and rank == 0:
        print(f"no checkpoint at {ckpt_path}: starting from scratch")
    if state is not None:
        model_config = ModelConfig(**state["model_config"])
    torch.manual_seed(config.seed)

    train_data, val_data = load_data(data, config.val_fraction, rank)
    stream = SegmentStream(train_data, config.batch, model_config.seg_len, rank, world)
    model = CompressiveTransformer(model_config).to(device)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        start = state["step"]
    if config.cuda_graph and (device.type != "cuda" or world > 1):
        raise ValueError("cuda_graph needs one process on a CUDA device, got "
                         f"{world} process(es) on {device}")
    optimizer = make_optimizer(model, config, device, state and state["optimizer"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    use_amp = config.amp and device.type == "cuda"
    memory_dtype = torch.bfloat16 if use_amp else None

    log = MetricsLog(out, rank == 0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = config.batch * model_config.seg_len * world
    if rank == 0:
        print(f"model: {n_params / 1e6:.2f}M parameters, {model_config}\n"
              f"data: {train_data.numel():,} train / {val_data.numel():,} validation bytes; "
              f"{world} process(es) x batch {config.batch} x {model_config.seg_len} tokens; "
              f"device {device}, bf16 autocast {'on' if use_amp else 'off'}", flush=True)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

    def validate(step, max_segments):
        bpc = bits_per_byte(model, val_data, streams=config.eval_batch * world, device=device,
                            amp=use_amp, max_segments=max_segments, rank=rank, world=world)
        log.write(step=step, split="val", bpc=bpc, segments=max_segments)
        if rank == 0:
            checkpoint.save(ckpt_path, model, optimizer, step, model_config, config, val_bpc=bpc,
                            world=world, data=data)
            log.plot()
        return bpc

    memories = model.init_memories(config.batch, device, memory_dtype)
    sums = torch.zeros(3, device=device)  # [loss, aux, steps] since the last log line
    started = last_time = time.perf_counter()
    done, val_bpc = start, None
    net.train()
    step_fn = functools.partial(train_step, net, model, optimizer, memories, clip=config.clip,
                                amp=use_amp)
    if config.cuda_graph:
        step_fn = CudaGraphTrainStep(net, model, optimizer, memories, config.batch,
                                     model_config.seg_len, config.clip, use_amp)
    for step in range(start, config.steps):
        lr = learning_rate(step, config)
        set_lr(optimizer, lr)
        if step % stream.segments == 0 and step > start:  # a new pass over the text
            memories.reset()
        inputs, targets = (t.to(device, non_blocking=True) for t in stream.segment(step))
        loss, aux = step_fn(inputs, targets)
        sums += torch.stack([loss, aux, torch.ones((), device=device)])

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            (mean_loss, mean_aux), count = (sums[:2] / sums[2]).tolist(), sums[2].item()
            now = time.perf_counter()
            tps = tokens_per_step * count / (now - last_time)
            log.write(step=done, split="train", loss=mean_loss, bpc=mean_loss / LN2, aux=mean_aux,
                      lr=lr, tokens_per_s=tps)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", bpc=f"{mean_loss / LN2:.3f}",
                                aux=f"{mean_aux:.2e}", tok_s=f"{tps:,.0f}",
                                val=f"{val_bpc:.3f}" if val_bpc is not None else "-", refresh=False)
            sums.zero_()
            last_time = now
        if bar is not None:
            bar.update(1)
        if done % config.log_every == 0 and out_of_time(started, config.max_minutes, device):
            break
        if done % config.eval_every == 0 and done < config.steps:
            val_bpc = validate(done, config.eval_segments)
            last_time = time.perf_counter()  # validation time is not training throughput

    if bar is not None:
        bar.close()
    val_bpc = validate(done, None) if done > start else None
    if rank == 0 and val_bpc is not None:
        print(f"step {done}: validation bpc={val_bpc:.4f} (all held-out documents); "
              f"checkpoint {ckpt_path}; {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)
    if world > 1:
        same = parameters_identical(model)
        if rank == 0:
            print(f"parameters identical across {world} ranks: {'yes' if same else 'NO'}", flush=True)
        if not same:
            raise RuntimeError("ranks diverged: parameters differ after training")
    return model
