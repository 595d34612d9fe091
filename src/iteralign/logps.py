"""Per-sequence log-probabilities of completions, shared by reference, train, sft and evaluate."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from iteralign.tokens import Encoded, collate, process_chunks


def completion_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over completion tokens, and their count.

    Args:
        input_ids, attention_mask, completion_mask: ``[B, L]``, right padded;
            completion_mask is 1 on completion tokens (the targets).

    Returns:
        ``[B]`` summed log-probs (float32) and ``[B]`` token counts.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    # gather - logsumexp avoids materialising a second [B, L, V] log_softmax tensor.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def packed_completion_logps(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, completion_mask: torch.Tensor,
    segments: torch.Tensor, count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logps` of sequences packed padding-free (``tokens.collate_packed``).

    No attention mask is passed: transformers reads the packing from ``position_ids`` and
    lets each sequence attend only to its own earlier tokens. The output layer and the
    log-softmax run only at the positions that predict a completion token.

    Returns:
        ``[count]`` summed log-probs (float32) and token counts of the ``count`` sequences, in the
        order they were given to ``collate_packed``.
    """
    targets = completion_mask[:, 1:].bool()
    predicting = torch.nn.functional.pad(targets, (0, 1))  # position t predicts token t+1
    with _output_layer_at(model, predicting):
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    selected = (logits if logits.dim() == 2 else logits[predicting]).float()  # [K, V]
    token_logps = selected.gather(-1, input_ids[:, 1:][targets].unsqueeze(-1)).squeeze(-1) - selected.logsumexp(-1)
    owner = segments[:, 1:][targets]
    sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owner, token_logps)
    lengths = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, owner, torch.ones_like(token_logps))
    return sums, lengths


@contextlib.contextmanager
def _output_layer_at(model, rows: torch.Tensor):
    """Within: the model's output layer (``get_output_embeddings``, the vocabulary projection)
    sees only the hidden states at ``rows`` (``[R, T]`` bool), so the logits come out ``[K, V]``
    and prompt and padding positions cost no projection (nor a [R, T, V] gradient). The hook
    sits on the inner model, so DDP, FSDP and peft wrappers still run their own forward. A
    model whose output layer is not found, or is called otherwise, gives its full logits."""
    from accelerate.utils import extract_model_from_parallel

    head = extract_model_from_parallel(model).get_output_embeddings()
    if head is None:
        yield
        return

    def select(module, args):
        if args and args[0].shape[:2] == rows.shape:
            return (args[0][rows], *args[1:])
        return None

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def batched_completion_logps(
    model,
    encoded: list[Encoded],
    pad_id: int,
    batch_size: int,
    device,
    progress: str | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of many sequences, in length-sorted batches; results in input order.

    With ``world > 1`` (inside an initialised process group) each process computes
    its round-robin share of the length-sorted sequences, every process running the
    same number of batches (a sharded or DDP-wrapped model needs matching forward
    passes), and the shares are gathered so every process returns all results.
    """
    from tqdm import tqdm

    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    logps = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    if not encoded:
        return logps, counts
    chunks = process_chunks(order, rank, world, batch_size)
    mine: list[tuple[int, float, int]] = []
    for chunk, weight in tqdm(chunks, desc=progress, disable=progress is None or rank > 0, mininterval=5):
        tensors = collate([encoded[i] for i in chunk], pad_id, device)
        sums, n = completion_logps(model, **tensors)
        if weight:
            mine.extend(zip(chunk, sums.double().cpu().tolist(), n.long().cpu().tolist(), strict=True))
    if world > 1:
        import torch.distributed as dist

        shares: list = [None] * world
        dist.all_gather_object(shares, mine)
        mine = [row for share in shares for row in share]
    for index, logp, count in mine:
        logps[index], counts[index] = logp, count
    return logps, counts
