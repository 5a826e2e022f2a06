"""Command line: ``python -m compressive_transformer {train,eval,generate} ...``.

    train    --preset tiny [--data PATH] [--out DIR] [--steps N] [--resume] ...
    eval     --checkpoint DIR/last.pt [--data FILE]        prints bpc=<value> (default: the
                                                           held-out documents)
    generate --checkpoint DIR/last.pt --prompt TEXT --length N
Under ``torchrun --nproc_per_node N -m compressive_transformer train ...`` training is
data-parallel (DDP).
"""
from __future__ import annotations

import argparse
import sys

import torch

from compressive_transformer.config import COMPRESS_LOSSES, PRESETS, preset
from ct_kernels import COMPRESS_METHODS


def _add_train(sub):
    p = sub.add_parser("train", help="train a model (default data: the Shakespeare corpus)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--data", help="a text or enwik8-style byte file, a .zip, or a folder of text "
                                  "files (default: the public-domain corpus, see data.py)")
    p.add_argument("--out", help="output folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", help="default: cuda (the local rank's GPU) if present, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("optimisation (defaults: the preset's)")
    for flag, kind in (("steps", int), ("batch", int), ("lr", float), ("min-lr", float),
                       ("warmup", int), ("clip", float), ("weight-decay", float),
                       ("eval-every", int), ("eval-batch", int), ("eval-segments", int),
                       ("log-every", int), ("val-fraction", float), ("seed", int),
                       ("max-minutes", float), ("cpu-threads", int)):
        g.add_argument(f"--{flag}", type=kind)
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                   help="no bf16 autocast on GPU")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--cuda-graph", action="store_true", default=None,
                   help="capture the training step once as a CUDA graph and replay it (one GPU)")
    g = p.add_argument_group("model (defaults: the preset's)")
    for flag in ("dim", "layers", "heads", "ff-mult", "seg-len", "mem-len", "cmem-len", "rate",
                 "dilation"):
        g.add_argument(f"--{flag}", type=int)
    g.add_argument("--compress-method", choices=COMPRESS_METHODS)
    g.add_argument("--compress-loss", choices=COMPRESS_LOSSES)
    g.add_argument("--memory-layers", type=int, nargs="+", help="0-based layers with memory")
    g.add_argument("--pre-ln", action="store_true", default=None)
    g.add_argument("--dropout", type=float)
    g.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"))
    g.add_argument("--recompute-scores", dest="store_score_grads", action="store_false",
                   default=None, help="attention backward recomputing the scores instead of "
                   "keeping their gradients (slower on the GPU, less memory)")
    g.add_argument("--store-position-scores", action="store_true", default=None,
                   help="each layer's attention forward keeps its position scores for the "
                   "backward (faster on the GPU; one [B, H, n, L] buffer per layer)")


def _run_train(args):
    from compressive_transformer.train import train
    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "preset", "data", "out", "resume", "device", "no_progress")}
    model_config, train_config = preset(args.preset, **fields)
    train(model_config, train_config, data=args.data, out=args.out or f"runs/{args.preset}",
          resume=args.resume, device=args.device, progress=not args.no_progress)


def _add_eval(sub):
    p = sub.add_parser("eval", help="bits per byte of a whole file, memories carried across")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="a text or byte file (default: the held-out validation "
                                  "documents of the checkpoint's training data)")
    p.add_argument("--streams", type=int, default=8,
                   help="contiguous slices read in parallel (each starts with empty memories)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"))


def _run_eval(args):
    from compressive_transformer.checkpoint import load_model
    from compressive_transformer.data import as_tensor, load_documents, split_documents
    from compressive_transformer.evaluate import bits_per_byte
    if args.streams < 1:
        raise ValueError(f"--streams must be >= 1, got {args.streams}")
    model, state = load_model(args.checkpoint, args.device, args.backend)
    if args.data is None:
        _, text = split_documents(load_documents(state.get("data")),
                                  state["train_config"]["val_fraction"])
    else:
        text = open(args.data, "rb").read()
    data = as_tensor(text)
    if data.numel() < 2:
        raise ValueError(f"{args.data} must hold at least 2 bytes")
    bpc = bits_per_byte(model, data, streams=args.streams, device=args.device, amp=args.amp)
    print(f"bpc={bpc:.4f}")


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample a continuation of a prompt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"))


def _run_generate(args):
    from compressive_transformer.checkpoint import load_model
    from compressive_transformer.generate import generate
    model, _ = load_model(args.checkpoint, args.device, args.backend)
    prompt = torch.tensor(list(args.prompt.encode("utf-8")), device=args.device)[None]
    if prompt.numel() == 0:
        raise ValueError("--prompt must not be empty")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens, tokens_per_s = generate(model, prompt, args.length, temperature=args.temperature,
                                    top_k=args.top_k, amp=args.amp, generator=generator)
    sys.stdout.write(args.prompt + bytes(tokens[0].tolist()).decode("utf-8", errors="replace") + "\n")
    print(f"[{args.length} tokens, {tokens_per_s:,.1f} tokens/s]", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m compressive_transformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    {"train": _run_train, "eval": _run_eval, "generate": _run_generate}[args.command](args)


if __name__ == "__main__":
    main()
