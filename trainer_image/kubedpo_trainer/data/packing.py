"""Padding-free packing of preference pairs, optionally with the prompt shared by both responses.

A stage on top of the stream's batches: an optimizer step's pairs (batchSize x
gradientAccumulationSteps per rank, exactly the rows the stream yields, so exact resume and
exactly-once are the stream's) are split into micro-batches of at most `packing.maxTokens`
tokens, and each micro-batch is packed into a few rows with no padding between sequences.

Layout of one pair (a *unit*), placed whole in one row:
- unshared: two units, [prompt chosen] and [prompt rejected], positions 0.. each;
- shared (`sharePrompt`): one unit [prompt chosen rejected]; chosen's positions continue from
  the prompt (P..P+C-1), rejected's too (P..P+R-1), and rejected never sees chosen.
Attention: token q sees token k iff k <= q, both are in the same unit, and k is a prompt token
or in q's own part. That is a block-sparse causal mask (block-diagonal over units); with RoPE
and per-part positions every response token computes exactly what it would in its own padded
row. The first response token of each part is predicted by the prompt's last token, so in the
shared layout that logit is used twice (gather plan `src`).

Units are placed first-fit-decreasing into rows of `rowTokens` (at least the longest unit):
rows stay short so a dense-mask attention kernel (CPU, SDPA) pays O(row^2), not O(budget^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Batch, PackedBatch
from .tokenize import TokenizedRow

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAD_SEGMENT = -1


def rows_from_batch(batch: Batch) -> list[TokenizedRow]:
    """The pairs of a collated (2B, T) batch (the collate contract), back as token lists.

    Packing sits on top of whatever the stream yields, so it reads the batch contract rather
    than the stream's internals: row i is prompt+chosen, row B+i prompt+rejected, the prompt is
    everything before the first loss-mask position.
    """
    ids, attn, mask = batch["input_ids"], batch["attention_mask"].bool(), batch["loss_mask"].bool()
    b = ids.shape[0] // 2
    out = []
    for i in range(b):
        seqs = []
        for r in (i, b + i):
            n = int(attn[r].sum())
            resp = mask[r, :n].nonzero()
            p = int(resp[0]) if len(resp) else n
            seqs.append((ids[r, :p].tolist(), ids[r, p:n].tolist()))
        (prompt, chosen), (_, rejected) = seqs
        out.append(TokenizedRow(batch["row_ids"][i], prompt, chosen, rejected,
                                float(batch["margin"][i]), float(batch["weight"][i])))
    return out


def pair_tokens(row: TokenizedRow, share_prompt: bool) -> int:
    """Tokens a pair occupies once packed."""
    p = len(row.prompt_ids)
    return p + len(row.chosen_ids) + len(row.rejected_ids) + (0 if share_prompt else p)


def split_by_budget(rows: list[TokenizedRow], max_tokens: int, share_prompt: bool) -> list[list[int]]:
    """Indices of `rows` in consecutive micro-batches of at most `max_tokens` tokens each.

    A pair longer than the budget gets a micro-batch of its own (it cannot be split).
    """
    chunks: list[list[int]] = []
    used = 0
    for i, r in enumerate(rows):
        n = pair_tokens(r, share_prompt)
        if not chunks or used + n > max_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks


def split_into(rows: list[TokenizedRow], chunks: list[list[int]], count: int,
               share_prompt: bool) -> list[list[int]]:
    """`chunks` split further until there are `count` (every rank must run as many micro-batches:
    FSDP gathers per forward). The heaviest chunk with two or more pairs is halved each time."""
    if count > len(rows):
        raise ValueError(f"cannot make {count} micro-batches of {len(rows)} pairs")
    chunks = [list(c) for c in chunks]
    while len(chunks) < count:
        weight = [sum(pair_tokens(rows[i], share_prompt) for i in c) if len(c) > 1 else -1 for c in chunks]
        j = max(range(len(chunks)), key=weight.__getitem__)
        c = chunks[j]
        chunks[j:j + 1] = [c[:len(c) // 2], c[len(c) // 2:]]
    return chunks


@dataclass(frozen=True)
class _Unit:
    pair: int
    parts: tuple[tuple[int, list[int]], ...]  # (part, token ids) in order; PROMPT first

    def __len__(self) -> int:
        return sum(len(t) for _, t in self.parts)


def _units(rows: list[TokenizedRow], share_prompt: bool) -> list[_Unit]:
    out = []
    for i, r in enumerate(rows):
        if share_prompt:
            out.append(_Unit(i, ((PROMPT, r.prompt_ids), (CHOSEN, r.chosen_ids), (REJECTED, r.rejected_ids))))
        else:
            out.append(_Unit(i, ((PROMPT, r.prompt_ids), (CHOSEN, r.chosen_ids))))
            out.append(_Unit(i, ((PROMPT, r.prompt_ids), (REJECTED, r.rejected_ids))))
    return out


def _first_fit(units: list[_Unit], cap: int) -> list[list[_Unit]]:
    """First-fit decreasing; ties keep input order, so the layout is deterministic."""
    bins: list[list[_Unit]] = []
    fill: list[int] = []
    for u in sorted(units, key=lambda u: -len(u)):
        for j, f in enumerate(fill):
            if f + len(u) <= cap:
                bins[j].append(u)
                fill[j] += len(u)
                break
        else:
            bins.append([u])
            fill.append(len(u))
    return bins


def pack(rows: list[TokenizedRow], pad_id: int, share_prompt: bool, row_tokens: int) -> PackedBatch:
    """The packed micro-batch of `rows` (the contract of `packed_forward.packed_forward`).

    Keys: input_ids, position_ids, segment, part (R, T) long; gather plan `tgt_row`, `src_pos`,
    `target`, `seq` (M,) long (response token m: its logit
    sits at (tgt_row[m], src_pos[m]), its id is target[m], and it belongs to sequence seq[m]:
    chosen of pair i is i, rejected is B + i); margin, weight (B,); row_ids; num_tokens.
    """
    if not rows:
        raise ValueError("pack needs at least one row")
    b = len(rows)
    units = _units(rows, share_prompt)
    bins = _first_fit(units, max(row_tokens, max(len(u) for u in units)))
    t = max(sum(len(u) for u in bn) for bn in bins)
    shape = (len(bins), t)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, PAD_SEGMENT, dtype=torch.long)
    part = torch.zeros(shape, dtype=torch.long)
    tgt_row: list[int] = []
    src_pos: list[int] = []
    target: list[int] = []
    seq: list[int] = []
    for r, bn in enumerate(bins):
        at = 0
        for s, u in enumerate(bn):
            prompt_start, prompt_end = at, at + len(u.parts[0][1])
            for kind, toks in u.parts:
                n = len(toks)
                first = 0 if kind == PROMPT else prompt_end - prompt_start  # position of token 0
                input_ids[r, at:at + n] = torch.tensor(toks, dtype=torch.long)
                position_ids[r, at:at + n] = torch.arange(first, first + n)
                segment[r, at:at + n] = s
                part[r, at:at + n] = kind
                if kind != PROMPT:
                    # Token j is predicted by the previous token of its own sequence: the prompt's
                    # last for j = 0, else j - 1. Without a prompt, token 0 has no prediction
                    # (as in sequence_logps).
                    for j in range(n):
                        src = prompt_end - 1 if j == 0 else at + j - 1
                        if src < prompt_start:
                            continue
                        tgt_row.append(r)
                        src_pos.append(src)
                        target.append(toks[j])
                        seq.append(u.pair if kind == CHOSEN else b + u.pair)
                at += n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment,
        "part": part,
        "tgt_row": torch.tensor(tgt_row, dtype=torch.long),
        "src_pos": torch.tensor(src_pos, dtype=torch.long),
        "target": torch.tensor(target, dtype=torch.long),
        "seq": torch.tensor(seq, dtype=torch.long),
        "pairs": b,
        "margin": torch.tensor([r.margin for r in rows], dtype=torch.float32),
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),
        "row_ids": [r.row_id for r in rows],
        # Tokens of the sequences as a padded batch holds them (prompt counted twice): the same
        # unit whatever the layout, so tokens/s shows what packing and sharing gain.
        "num_tokens": sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows),
    }

