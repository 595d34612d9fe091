"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Shards a tiny Llama with FSDP2's ``fully_shard`` (as accelerate's FSDP config does on
GPUs), takes one AdamW step, saves the optimizer state whole with
``optimizer_state_to_save`` into <folder>, then loads it back into a freshly sharded
model with ``load_training_state`` and checks every process's shards came back.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from iteralign.demo import ALPHABET
from iteralign.tiny import build_char_tokenizer, build_llama
from iteralign.train.checkpoint import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    load_training_state,
    optimizer_state_to_save,
)

INPUT = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])


def sharded_model_and_optimizer():
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_llama(tokenizer, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=0)
    names = [name for name, _ in model.named_parameters()]
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # on the sharded parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, names


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optimizer, scheduler, names = sharded_model_and_optimizer()
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    saved = optimizer_state_to_save(model, optimizer)
    if rank == 0:
        assert sorted(saved["state"]) == list(range(len(names))), sorted(saved["state"])
        torch.save(saved, folder / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    else:
        assert saved == {}
    dist.barrier()

    fresh, fresh_optimizer, fresh_scheduler, _ = sharded_model_and_optimizer()
    _, resumed = load_training_state(folder, fresh_optimizer, fresh_scheduler, fresh, names)
    assert resumed
    for before, after in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            mine, loaded = optimizer.state[before][key], fresh_optimizer.state[after][key]
            assert mine.to_local().shape == loaded.to_local().shape
            assert torch.equal(mine.to_local(), loaded.to_local()), key
    print(f"rank {rank}: optimizer state round trip ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
