"""The model layer: shapes, memories, stop-gradients, positions, cached generation."""
import copy
import dataclasses
import gc
import math

import pytest
import torch

from compressive_transformer import CompressiveTransformer, ModelConfig
from compressive_transformer.config import TrainConfig
from compressive_transformer.train import CudaGraphTrainStep, make_optimizer, set_lr, train_step
from compressive_transformer.generate import DecodeState, generate, sample

# backend="reference": tests/conftest.py turns on the Triton interpreter on CPU, which the
# kernels' own tests use; the model's tests check the model, at the reference's speed.
TINY = dict(vocab_size=32, dim=32, layers=2, heads=4, seg_len=8, mem_len=8, cmem_len=4, rate=2,
            dropout=0.0, backend="reference")
VARIANTS = {
    "conv-attention": dict(compress_method="conv", compress_loss="attention"),
    "dilated-autoencoding": dict(compress_method="dilated_conv", compress_loss="autoencoding"),
    "mean": dict(compress_method="mean", compress_loss="none"),
    "max": dict(compress_method="max", compress_loss="none"),
    "most-used": dict(compress_method="most_used", compress_loss="none"),
    "transformer-xl": dict(cmem_len=0, compress_method="mean", compress_loss="none"),
    "pre-ln": dict(pre_ln=True),
    "memory-on-layer-1": dict(memory_layers=(1,)),
    "mem-shorter-than-segment": dict(mem_len=4, cmem_len=6),
    "mem-longer-than-segment": dict(mem_len=20, cmem_len=4),  # memory fills over 3 segments
    "cmem-longer-than-evictions": dict(cmem_len=12),  # compressed memory fills over 3 segments
}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CompressiveTransformer(ModelConfig(**{**TINY, **overrides}))


def tokens(B, n, seed=1, vocab=32):
    return torch.randint(0, vocab, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_backward_and_memory_lengths(variant):
    model = make_model(**VARIANTS[variant])
    c = model.config
    memories = None
    for step in range(3):
        logits, memories, aux = model(tokens(3, c.seg_len, seed=step), memories)
        assert logits.shape == (3, c.seg_len, c.vocab_size) and aux.dim() == 0
        (logits.logsumexp(-1).mean() + aux).backward()
    for i, memory in enumerate(memories.layers):
        if not c.has_memory(i):
            assert memory is None
            continue
        assert memory.mem_lens.tolist() == [min(c.mem_len, 3 * c.seg_len)] * 3
        evicted = max(0, 3 * c.seg_len - c.mem_len)
        assert memory.cmem_lens.tolist() == [min(c.cmem_len, evicted // c.rate)] * 3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_memory_holds_the_attention_inputs():
    """Post-LN: a layer's memory stores its input h; pre-LN: LN(h)."""
    for pre_ln in (False, True):
        model = make_model(pre_ln=pre_ln, cmem_len=0, compress_method="mean", compress_loss="none")
        x = tokens(2, 8)
        inputs = []
        hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
                 for layer in model.layers]
        _, memories, _ = model(x)
        for hook in hooks:
            hook.remove()
        for layer, h, memory in zip(model.layers, inputs, memories.layers):
            torch.testing.assert_close(memory.mem, layer.attention_input(h).detach())


def test_first_segment_equals_a_model_without_memory():
    """Empty memories are fully masked and positions count from the segment's own keys."""
    with_memory = make_model()
    without = make_model(mem_len=0, cmem_len=0, compress_method="mean", compress_loss="none")
    without.load_state_dict(with_memory.state_dict(), strict=False)
    x = tokens(2, 8)
    torch.testing.assert_close(with_memory(x)[0], without(x)[0])


@pytest.mark.parametrize("sizes", [dict(), dict(mem_len=0, cmem_len=0, compress_method="mean",
                                                 compress_loss="none")])
def test_memories_carry_context_across_segments(sizes):
    model = make_model(**sizes)
    first_a, first_b, second = tokens(2, 8, seed=1), tokens(2, 8, seed=2), tokens(2, 8, seed=3)
    _, mem_a, _ = model(first_a)
    _, mem_b, _ = model(first_b)
    out_a, out_b = model(second, mem_a)[0], model(second, mem_b)[0]
    has_memory = model.config.mem_len > 0
    assert (out_a - out_b).abs().max().item() > 1e-4 if has_memory else torch.equal(out_a, out_b)


def test_stop_gradients():
    """Memories are constants; the compressor learns only from its loss, which trains
    nothing else."""
    model = make_model()
    _, memories, _ = model(tokens(2, 8, seed=1))
    _, memories, _ = model(tokens(2, 8, seed=2), memories)
    assert not any(m.mem.requires_grad or m.cmem.requires_grad for m in memories.layers)
    logits, memories, aux = model(tokens(2, 8, seed=3), memories)
    compressor = {id(p) for layer in model.layers for p in layer.compressor.parameters()}
    aux.backward(retain_graph=True)
    for p in model.parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == (id(p) in compressor)
    model.zero_grad(set_to_none=True)
    logits.logsumexp(-1).mean().backward()
    for layer in model.layers:
        assert all(p.grad is None for p in layer.compressor.parameters())
    assert model.layers[0].kv_proj.weight.grad.abs().sum() > 0


def test_full_memories_pass_no_lengths():
    model = make_model()
    memories = None
    for step in range(3):
        assert memories is None or not memories.full
        _, memories, _ = model(tokens(2, 8, seed=step), memories)
    assert memories.check_full()
    known, checked = copy.deepcopy(memories), copy.deepcopy(memories)
    checked.check_full = lambda: False  # pass the lengths anyway
    x = tokens(2, 8, seed=9)
    torch.testing.assert_close(model(x, known)[0], model(x, checked)[0])
    memories.reset(torch.tensor([True, False]))
    assert not memories.full and not memories.check_full()


def test_compressor_loss_waits_for_full_memories():
    model = make_model(mem_len=16)
    losses = []
    memories = None
    for step in range(3):
        _, memories, aux = model(tokens(2, 8, seed=step), memories)
        losses.append(aux.item())
    assert losses[0] == 0 and losses[1] == 0 and losses[2] > 0  # full after 2 segments


def test_reset_empties_chosen_samples():
    model = make_model()
    _, memories, _ = model(tokens(3, 8))
    memories.reset(torch.tensor([True, False, True]))
    assert memories.layers[0].mem_lens.tolist() == [0, 8, 0]
    fresh = model(tokens(1, 8, seed=5))[0]
    again = model(tokens(3, 8, seed=5)[:1].repeat(3, 1), memories)[0]
    torch.testing.assert_close(again[0], fresh[0])
    torch.testing.assert_close(again[2], fresh[0])


def segment_forward_logits(model, text):
    """Logits of ``text`` [B, T] fed segment by segment through the model's forward."""
    n, logits, memories = model.config.seg_len, [], None
    for start in range(0, text.shape[1], n):
        out, memories, _ = model(text[:, start:start + n], memories)
        logits.append(out)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_generation_matches_the_segment_forward(variant):
    """Feeding tokens in chunks of any size through the K/V caches gives the logits of the
    segment-by-segment forward (3.5 segments: memories and compressed memories roll over)."""
    model = make_model(**VARIANTS[variant]).eval()
    n = model.config.seg_len
    text = tokens(2, 3 * n + n // 2)
    expected = segment_forward_logits(model, text)
    state = DecodeState(model, 2, "cpu")
    got, start = [], 0
    for size in (1, 3, 2, 7, 1, 1, 5, 6, 2):
        got.append(state.feed(text[:, start:start + size]))
        start += size
    torch.testing.assert_close(torch.cat(got, dim=1), expected[:, :start], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_token_by_token_generation_matches_the_segment_forward(variant):
    """The one-token step on the static caches over 5.5 segments: memories fill, roll over
    and are compressed, the compressed memory fills (partially first) and rolls over."""
    model = make_model(**VARIANTS[variant]).eval()
    n = model.config.seg_len
    text = tokens(2, 5 * n + n // 2)
    state = DecodeState(model, 2, "cpu")
    got = torch.cat([state.feed(text[:, i:i + 1]) for i in range(text.shape[1])], dim=1)
    torch.testing.assert_close(got, segment_forward_logits(model, text), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_step_matches_the_eager_step(batch):
    """On the GPU (bf16 autocast, head dim 64: the decode kernel), the replayed one-token
    graphs give the eager step's logits over 3.5 segments, and generate samples the same
    tokens with and without them."""
    model = make_model(backend="auto", dim=128, heads=2).cuda().eval()
    n = model.config.seg_len
    text = tokens(batch, 3 * n + n // 2, seed=6).cuda()
    graphed = DecodeState(model, batch, "cuda")
    eager = DecodeState(model, batch, "cuda", cuda_graph=False)
    torch.testing.assert_close(graphed.feed(text[:, :5]), eager.feed(text[:, :5]))  # eager chunks
    for i in range(5, text.shape[1]):
        torch.testing.assert_close(graphed.feed(text[:, i:i + 1]), eager.feed(text[:, i:i + 1]),
                                   rtol=1.6e-2, atol=1e-3)
    assert eager.graphs is None and all(graph is not None for graph in graphed.graphs)
    with_graphs, _ = generate(model, text[:, :5], 3 * n, temperature=0)
    without, _ = generate(model, text[:, :5], 3 * n, temperature=0, cuda_graph=False)
    assert torch.equal(with_graphs, without)


def test_generation_reuses_memory_keys_between_segments():
    """Memory K/V are projected once: per token, kv_proj sees only the new token's rows,
    and at a segment's end only the new compressed slots."""
    model = make_model().eval()
    rows = []
    for layer in model.layers:
        layer.kv_proj.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    state = DecodeState(model, 1, "cpu")
    for _ in range(2 * model.config.seg_len):
        state.feed(tokens(1, 1))
    n, rate = model.config.seg_len, model.config.rate
    assert set(rows) == {1, n // rate}
    assert rows.count(n // rate) == 2 * len(model.layers)


def test_generate_and_sample():
    model = make_model().eval()
    out, tokens_per_s = generate(model, tokens(2, 5), 20, temperature=1.0, top_k=5,
                                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 20) and out.dtype == torch.int64 and tokens_per_s > 0
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]
    picks = {sample(logits, top_k=1).tolist()[0] for _ in range(5)}
    assert picks == {1}
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="length"):
        generate(model, tokens(1, 2), 0)


@pytest.mark.parametrize("bad, error, match", [
    (dict(dim=30), ValueError, "heads"),
    (dict(compress_method="pool"), ValueError, "compress_method"),
    (dict(compress_method="conv", compress_loss="none"), ValueError, "compress_loss"),
    (dict(compress_method="mean", compress_loss="attention"), ValueError, "compress_loss"),
    (dict(seg_len=7), ValueError, "rate"),
    (dict(mem_len=-1), ValueError, "mem_len"),
    (dict(memory_layers=(2,)), ValueError, "memory_layers"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(store_score_grads="yes"), TypeError, "store_score_grads"),
    (dict(store_position_scores=1), TypeError, "store_position_scores"),
    (dict(store_score_grads=False, store_position_scores=True), ValueError, "store_position_scores"),
])
def test_bad_configuration(bad, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(**{**TINY, **bad})


def test_bad_inputs():
    model = make_model()
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(8, dtype=torch.long))
    _, memories, _ = model(tokens(2, 8))
    with pytest.raises(ValueError, match="batch"):
        model(tokens(3, 8), memories)
    with pytest.raises(TypeError, match="memories"):
        model(tokens(2, 8), (None, None))
    with pytest.raises(ValueError, match="rate"):
        model(tokens(2, 7))


def test_config_round_trips_through_a_dict():
    config = ModelConfig(**{**TINY, "memory_layers": [0]})
    assert ModelConfig(**dataclasses.asdict(config)) == config


def test_compiles_with_no_graph_break_in_the_model_layer():
    """torch.compile gives the eager results; no graph break, whether the memories are
    empty, filling up or full (aot_eager: dynamo and autograd tracing without code
    generation)."""
    model = make_model()
    segments = [tokens(2, 8, seed=i) for i in range(4)]
    compiled = torch.compile(model, backend="aot_eager")
    eager_memories = compiled_memories = None
    for x in segments:
        explained = torch._dynamo.explain(model)(x, copy.deepcopy(eager_memories))
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        expected, eager_memories, _ = model(x, eager_memories)
        got, compiled_memories, _ = compiled(x, compiled_memories)
        torch.testing.assert_close(got, expected)


# The d1024-L4 preset's memory geometry at CPU size: n = m, rate 3, and a compressed memory
# that holds 4.5 segments' worth of compressed slots (cm = 1152 = 4.5 * 768 / 3), so the
# memories fill over six segments and the compressor loss starts on the second.
D1024_LIKE = dict(dim=32, heads=4, layers=1, seg_len=6, mem_len=6, cmem_len=9, rate=3,
                  compress_method="conv", compress_loss="attention")


def _train_steps(model, forward, steps, batch=2):
    """bench_train's step (Adam, gradient clipping) over ``steps`` segments of one stream;
    per step: the loss, the compressor loss and the gradients before clipping."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    memories = model.init_memories(batch)
    text = tokens(batch, steps * model.config.seg_len + 1, seed=5).to(model.embed.weight.device)
    n = model.config.seg_len
    history = []
    for step in range(steps):
        segment = text[:, step * n:(step + 1) * n + 1]
        logits, memories, aux = forward(segment[:, :-1], memories)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), segment[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        history.append((loss.detach(), aux.detach(), grads))
    return history, memories


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_training_matches_eager(dynamic):
    """Training steps of the compiled model (one graph, fullgraph=True, never recompiled
    while the memories fill) give eager's losses, gradients and memories. dynamic=True
    compiles with symbolic shapes, as a second model of other sizes in the same process
    gets them (bench_train compiled d1024-L4 after d512-L8). aot_eager: the reference ops,
    traced without code generation."""
    _check_compiled_training(make_model(**D1024_LIKE), "aot_eager", dynamic)


def test_kept_position_scores_train_as_the_band_does():
    """Training steps on the Triton kernels (on the GPU, or the interpreter on the CPU) with
    each layer's forward keeping its position scores for its backward give the losses and
    gradients of the steps whose backward scores the positions again (several layers' kept
    buffers alive at once; the compiled custom-op path: tests/test_attention_triton.py)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(backend="triton", mem_len=6, seg_len=6, cmem_len=3, rate=2, dim=16, heads=2)
    band = make_model(**config).to(device)
    expected, _ = _train_steps(band, band, 3)
    kept = make_model(**config, store_position_scores=True).to(device)
    got, _ = _train_steps(kept, kept, 3)
    for step, ((loss, aux, grads), (loss_k, aux_k, grads_k)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(loss_k, loss, rtol=1e-5, atol=1e-6, msg=f"loss, step {step}")
        torch.testing.assert_close(aux_k, aux, rtol=1e-4, atol=1e-9, msg=f"aux, step {step}")
        for key in grads:
            torch.testing.assert_close(grads_k[key], grads[key], rtol=1e-4, atol=1e-6,
                                       msg=f"grad of {key}, step {step}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_with_the_kernels_matches_the_reference_on_gpu(monkeypatch):
    """Eager training steps with the GPU kernels (auto backend) against the same model on the
    reference ops, fp32: the losses of every step and the first step's gradients. Later
    steps' compressor gradients are about 1e-11 here (the compressor starts as an exact
    average) and differ by about 2% between any two backends (seen with the Triton
    interpreter on the CPU), so they are not compared."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = {**D1024_LIKE, "dim": 64, "heads": 4}
    kernels = make_model(**config, backend="auto").cuda()  # same seed: the same weights
    reference = make_model(**config, backend="reference").cuda()
    expected, _ = _train_steps(reference, reference, 4)
    got, _ = _train_steps(kernels, kernels, 4)
    for step, ((loss, _, _), (loss_k, _, _)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(loss_k, loss, rtol=1e-4, atol=1e-6, msg=f"loss, step {step}")
    grads, grads_k = expected[0][2], got[0][2]
    assert grads_k.keys() == grads.keys()
    for name in grads:
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(grads_k[name], grads[name], rtol=1e-3, atol=1e-3 * scale + 1e-12,
                                   msg=f"grad of {name}, first step")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_training_matches_eager_on_gpu(dynamic):
    """The same on the GPU with the kernels and inductor: the Triton recon-loss kernels are
    traced as user-defined kernels, with symbolic sizes when dynamic (the launch that failed
    with "'float' object cannot be interpreted as an integer")."""
    model = make_model(**{**D1024_LIKE, "backend": "auto", "dim": 64, "heads": 4}).cuda()
    _check_compiled_training(model, "inductor", dynamic, rtol=1e-3, atol=1e-5)


def _check_compiled_training(eager, backend, dynamic, rtol=1e-4, atol=1e-6):
    torch._dynamo.reset()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    steps = 8  # the memories are full after 6 segments

    def forward_once_then_no_recompile(*args):
        if forward_once_then_no_recompile.calls:
            with torch._dynamo.config.patch(error_on_recompile=True):
                return compiled(*args)
        forward_once_then_no_recompile.calls += 1
        return compiled(*args)
    forward_once_then_no_recompile.calls = 0

    expected, eager_memories = _train_steps(eager, eager, steps)
    got, compiled_memories = _train_steps(model, forward_once_then_no_recompile, steps)
    assert eager_memories.full and not compiled_memories.full  # lengths passed when compiled
    for step, ((loss, aux, grads), (loss_c, aux_c, grads_c)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(loss_c, loss, rtol=rtol, atol=atol, msg=f"loss, step {step}")
        torch.testing.assert_close(aux_c, aux, rtol=rtol, atol=atol * 1e-3, msg=f"aux, step {step}")
        assert (aux > 0) == (step >= 1), (step, aux)
        assert grads_c.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=rtol, atol=atol,
                                       msg=f"grad of {name}, step {step}")
    for mem_c, mem in zip(compiled_memories.layers, eager_memories.layers):
        assert torch.equal(mem_c.mem_lens, mem.mem_lens) and torch.equal(mem_c.cmem_lens, mem.cmem_lens)
        torch.testing.assert_close(mem_c.mem, mem.mem, rtol=rtol, atol=atol)
        torch.testing.assert_close(mem_c.cmem, mem.cmem, rtol=rtol, atol=atol)


def test_cuda_graph_step_refuses_what_it_cannot_replay():
    model = make_model(**D1024_LIKE)
    memories = model.init_memories(2)
    optimizer = make_optimizer(model, TrainConfig(), "cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphTrainStep(model, model, optimizer, memories, 2, 6, 0.1, amp=False)


def test_optimizer_state_moves_between_eager_and_graph_modes():
    """A checkpoint of either mode resumes in the other: lr (float or device tensor),
    capturable, fused and the step count's device follow the mode asked for (here eager, on
    the CPU; the graph direction runs in the GPU test below)."""
    model = make_model(**D1024_LIKE)
    optimizer = make_optimizer(model, TrainConfig(lr=2e-3), "cpu")
    model(tokens(2, 6))[0].sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # as a CUDA graph run (fused Adam) saves it
        group["lr"], group["capturable"], group["fused"] = torch.tensor(2e-3), True, True
    resumed = make_optimizer(model, TrainConfig(lr=1.0), "cpu", state)
    for group in resumed.param_groups:
        assert group["lr"] == pytest.approx(2e-3) and isinstance(group["lr"], float)
        assert group["capturable"] is False and group["fused"] is False
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 1
               for s in resumed.state.values())
    set_lr(resumed, 5e-4)
    assert all(group["lr"] == 5e-4 for group in resumed.param_groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_keeps_what_its_graph_uses_alive_on_gpu():
    """Holding only the step (as bench_train does) keeps the model, optimiser state and
    memories that its graph reads and writes: replays after the caller's references are gone
    and the allocator's free blocks are released still train (a freed parameter or memory
    buffer would be an illegal address or garbage here)."""
    def make_step():
        model = make_model(**{**D1024_LIKE, "backend": "auto", "dim": 64, "heads": 4}).cuda()
        optimizer = make_optimizer(model, TrainConfig(lr=1e-3, cuda_graph=True), "cuda")
        memories = model.init_memories(2)
        first = next(model.parameters()).detach().clone()
        return CudaGraphTrainStep(model, model, optimizer, memories, 2, 6, 0.1, amp=False), first

    step, first = make_step()
    gc.collect()
    torch.cuda.empty_cache()
    text = tokens(2, 7, seed=3).cuda()
    losses = [step(text[:, :-1], text[:, 1:])[0].item() for _ in range(8)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert not torch.equal(next(step.model.parameters()), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_training_matches_eager_on_gpu():
    """Training steps replayed as one CUDA graph (``train --cuda-graph``) give eager's losses,
    compressor losses, parameters and memories while the memories fill, once they are full,
    and after one sample's memory is reset; with a learning rate that changes every step;
    fp32. Capturing undoes its warm-up steps."""
    eager = make_model(**{**D1024_LIKE, "backend": "auto", "dim": 64, "heads": 4}).cuda()
    graphed = copy.deepcopy(eager)
    config = TrainConfig(lr=1e-3, clip=0.1)
    optimizer = make_optimizer(eager, config, "cuda")
    optimizer_g = make_optimizer(graphed, dataclasses.replace(config, cuda_graph=True), "cuda",
                                 optimizer.state_dict())  # also: an eager state into graph mode
    B, n = 2, eager.config.seg_len
    memories, memories_g = eager.init_memories(B), graphed.init_memories(B)
    step_g = CudaGraphTrainStep(graphed, graphed, optimizer_g, memories_g, B, n, 0.1, amp=False)
    for p_g, p in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p_g, p)
    assert all(not m.mem_lens.any() for m in memories_g.layers if m is not None)
    text = tokens(B, 10 * n + 1, seed=9).cuda()
    for step in range(10):  # the memories are full after 6 segments
        if step == 8:
            which = torch.tensor([False, True], device="cuda")
            memories.reset(which)
            memories_g.reset(which)
        set_lr(optimizer, 1e-3 * (1 - step / 20))
        set_lr(optimizer_g, 1e-3 * (1 - step / 20))
        segment = text[:, step * n:(step + 1) * n + 1]
        loss, aux = train_step(eager, eager, optimizer, memories, segment[:, :-1], segment[:, 1:],
                               0.1, amp=False)
        loss_g, aux_g = step_g(segment[:, :-1], segment[:, 1:])
        torch.testing.assert_close(loss_g, loss, rtol=1e-4, atol=1e-6, msg=f"loss, step {step}")
        torch.testing.assert_close(aux_g, aux, rtol=1e-3, atol=1e-9, msg=f"aux, step {step}")
        for (name, p_g), p in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p_g, p, rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")
    for mem_g, mem in zip(memories_g.layers, memories.layers):
        assert torch.equal(mem_g.mem_lens, mem.mem_lens) and torch.equal(mem_g.cmem_lens, mem.cmem_lens)
        torch.testing.assert_close(mem_g.mem, mem.mem, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mem_g.cmem, mem.cmem, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_training_on_gpu():
    """The training step as ``train`` runs it on a GPU (bf16 autocast, bf16 memories), eager
    and replayed as a CUDA graph, at head dim 64, where a Hopper GPU takes the sm_90
    relative-position forward: the graph's first loss is eager's (the same kernels on the same
    parameters), and every loss and compressor loss is finite while the memories fill."""
    eager = make_model(**{**D1024_LIKE, "backend": "auto", "dim": 128, "heads": 2}).cuda()
    graphed = copy.deepcopy(eager)
    config = TrainConfig(lr=1e-3, clip=0.1)
    optimizer = make_optimizer(eager, config, "cuda")
    optimizer_g = make_optimizer(graphed, dataclasses.replace(config, cuda_graph=True), "cuda",
                                 optimizer.state_dict())
    B, n = 2, eager.config.seg_len
    memories = eager.init_memories(B, dtype=torch.bfloat16)
    memories_g = graphed.init_memories(B, dtype=torch.bfloat16)
    step_g = CudaGraphTrainStep(graphed, graphed, optimizer_g, memories_g, B, n, 0.1, amp=True)
    text = tokens(B, 8 * n + 1, seed=4).cuda()
    for step in range(8):  # the memories are full after 6 segments
        segment = text[:, step * n:(step + 1) * n + 1]
        results = [train_step(eager, eager, optimizer, memories, segment[:, :-1], segment[:, 1:],
                              0.1, amp=True), step_g(segment[:, :-1], segment[:, 1:])]
        assert all(math.isfinite(t.item()) for pair in results for t in pair), (step, results)
        if step == 0:
            torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiles_on_gpu_with_the_kernels_and_no_graph_break_from_our_ops():
    """On the GPU (Triton attention and losses, CUDA memory update, inductor code generation),
    the compiled model matches eager within float32 kernel tolerance, and with full memories
    no graph break starts in ct_kernels or in this package."""
    model = make_model(backend="auto", dim=64, heads=2).cuda()
    segments = [tokens(2, 8, seed=i).cuda() for i in range(4)]
    compiled = torch.compile(model)
    eager_memories = compiled_memories = None
    for x in segments:
        expected, eager_memories, _ = model(x, eager_memories)
        got, compiled_memories, aux = compiled(x, compiled_memories)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        (got.square().mean() + aux).backward()  # the compiled backward of every op
    explained = torch._dynamo.explain(model)(segments[0], eager_memories)
    causes = [r.user_stack[-1].filename for r in explained.break_reasons if r.user_stack]
    assert not [f for f in causes if "compressive_transformer" in f or "ct_kernels" in f], causes
