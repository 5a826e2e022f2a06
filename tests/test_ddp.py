"""Data-parallel training: 2 CPU processes (gloo) for a few steps, then a resume in one."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressive_transformer import CompressiveTransformer
from compressive_transformer.config import preset
from compressive_transformer.train import train

OVERRIDES = dict(dim=32, layers=2, heads=2, seg_len=16, mem_len=16, cmem_len=8, rate=2,
                 backend="reference", batch=2, warmup=2, eval_every=3, eval_batch=2,
                 log_every=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, text, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model_config, train_config = preset("tiny", steps=4, **OVERRIDES)
    model = train(model_config, train_config, data=text, out=out, device="cpu", progress=False)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_end_with_identical_parameters_and_resume_in_one(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(b"".join(f"line {i}: a fair day in the kingdom\n".encode() for i in range(300)))
    out = str(tmp_path / "run")
    mp.spawn(_worker, args=(2, _free_port(), str(text), out), nprocs=2, join=True)

    states = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    saved = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert saved["step"] == 4 and saved["world"] == 2
    for name, value in saved["model"].items():
        assert torch.equal(value, states[0][name]), name
    # the trained parameters moved away from the shared initialisation
    torch.manual_seed(0)
    initial = CompressiveTransformer(preset("tiny", **OVERRIDES)[0]).state_dict()
    assert any(not torch.equal(initial[k], states[0][k]) for k in initial)

    # resume the 2-process checkpoint in a single process
    model_config, train_config = preset("tiny", steps=6, **OVERRIDES)
    model = train(model_config, train_config, data=str(text), out=out, resume=True, device="cpu",
                  progress=False)
    assert torch.load(os.path.join(out, "last.pt"), weights_only=False)["step"] == 6
    assert any(not torch.equal(p.detach(), states[0][k]) for k, p in model.state_dict().items())
