"""Sequence parallelism over the video tokens: Ulysses, ring attention, and the two as a 2-D mesh.

Layout. The block stack's video tokens (N of them, t-major) are padded to ``N_pad = P * c`` (P = ulysses x ring,
c = ceil(N / P)) and rank ``s`` of the sequence group holds tokens ``[s c, (s + 1) c)`` with their own RoPE rows,
so every token keeps its true position. Padding tokens sit at the end of the last chunks; they are masked as keys
and their outputs are dropped, so any resolution works without resizing the video. Every rank holds the whole text
stream (it is short) and computes it identically, so the text stays replicated through the stack.

Attention (:class:`SequenceAttention`, plugged into ``layers.attention`` as a callable backend):

- Ulysses (degree U): one all-to-all turns "all heads, my c tokens" into "heads [u H/U, (u+1) H/U), the U c tokens
  of my Ulysses group"; each rank takes the text q/k/v of those heads from its own copy. After attention a second
  all-to-all brings the video outputs back to "all heads, my tokens" and an all-gather over the heads gives every
  rank the text outputs.
- Ring (degree R): each rank keeps its queries; the video k/v spans travel around the ring (send to the next rank
  while computing on the current span) and the partial results are merged with their log-sum-exp. The text k/v are
  already on every rank, so each rank attends to them once, locally. Text queries merge their partials in a fixed
  order (span 0, 1, ..., text), so every rank of a ring computes bit-identical text outputs.
- 2-D: Ulysses inside groups of U consecutive ranks, ring across the groups (``ulysses * ring`` = the group size).

Inference only: the collectives are not differentiated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..model.layers import DEFAULT_CHUNK_SCORE_BYTES, attention, attention_chunk_size

if TYPE_CHECKING:
    from ..model.transformer import BlockStackInputs, RopeTables
    from .mesh import Parallel


# ---------------------------------------------------------------------------------------------
# Pure pieces: chunk layout, RoPE rows, attention with its log-sum-exp, merging partial results


def chunk_layout(n_tokens: int, degree: int) -> tuple[int, int]:
    """(tokens per rank c, padded length P c) for ``n_tokens`` video tokens over ``degree`` ranks."""
    if n_tokens < 1 or degree < 1:
        raise ValueError(f"need at least one token and one rank, got {n_tokens} tokens over {degree} ranks")
    c = -(-n_tokens // degree)
    return c, c * degree


def take_rows(x: Tensor, start: int, length: int, fill: float = 0.0) -> Tensor:
    """Rows [start, start + length) of ``x`` along dim 1 (dim 0 for a 2-D table), padded with ``fill`` past its end;
    always a new contiguous tensor."""
    dim = 1 if x.dim() >= 3 else 0
    n = x.shape[dim]
    have = max(0, min(start + length, n) - start)
    shape = list(x.shape)
    shape[dim] = length
    out = x.new_full(shape, fill)
    if have:
        out.narrow(dim, 0, have).copy_(x.narrow(dim, start, have))
    return out


def local_rope(rope: "RopeTables", start: int, length: int) -> "RopeTables":
    """The RoPE rows of tokens [start, start + length); rows past the real tokens rotate by nothing (cos 1, sin 0)."""
    return type(rope)(take_rows(rope.cos, start, length, 1.0), take_rows(rope.sin, start, length, 0.0),
                      take_rows(rope.rotation, start, length, 1.0))


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor] = None, *,
                       max_score_bytes: int = DEFAULT_CHUNK_SCORE_BYTES) -> tuple[Tensor, Tensor]:
    """Softmax attention over [B, H, L, D] tensors that also returns each row's log-sum-exp of the scores.

    ``key_valid``: boolean, broadcastable to [B, Lk] (True = may attend). Returns (out [B, H, Lq, Dv] fp32,
    lse [B, H, Lq] fp32); a row with no valid key gets out 0 and lse -inf, so it weighs nothing when merged.
    fp32 math, a chunk of queries at a time (never an Lq x Lk score matrix beyond ``max_score_bytes``).
    """
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
    if lq == 0 or lk == 0:
        return out, lse
    scale = 1.0 / math.sqrt(d)
    kt = k.float().transpose(-1, -2)
    vf = v.float()
    bias = None
    if key_valid is not None:
        valid = key_valid.reshape(-1, lk) if key_valid.dim() > 1 else key_valid[None]
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=q.device).masked_fill_(~valid, float("-inf"))
        bias = bias[:, None, None, :]  # [B or 1, 1, 1, Lk]
    step = attention_chunk_size(b * h, lk, max_score_bytes)
    for start in range(0, lq, step):
        stop = min(start + step, lq)
        scores = torch.matmul(q[:, :, start:stop].float() * scale, kt)
        if bias is not None:
            scores.add_(bias)
        row_max = scores.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)
        weights = scores.sub_(row_max).exp_()
        denom = weights.sum(dim=-1, keepdim=True)
        out[:, :, start:stop] = torch.matmul(weights, vf).div_(denom.clamp(min=torch.finfo(torch.float32).tiny))
        lse[:, :, start:stop] = (row_max + denom.log()).squeeze(-1)
        del scores, weights
    return out, lse


def merge_partials(out: Tensor, lse: Tensor, other_out: Tensor, other_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    out = (e^lse1 out1 + e^lse2 out2) / e^lse, lse = log(e^lse1 + e^lse2); partials with lse -inf weigh nothing.
    Updates ``out`` and ``lse`` in place and returns them.
    """
    total = torch.logaddexp(lse, other_lse)
    ref = torch.where(torch.isinf(total), torch.zeros_like(total), total)  # all -inf: both weights exp(-inf) = 0
    w_self = torch.exp(lse - ref).unsqueeze(-1)
    w_other = torch.exp(other_lse - ref).unsqueeze(-1)
    out.mul_(w_self).add_(other_out * w_other)
    lse.copy_(total)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Collectives


def all_gather_cat(x: Tensor, group, dim: int) -> Tensor:
    """The tensors of every rank of ``group`` concatenated along ``dim`` in group rank order."""
    n = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))  # the ranks' tensors end to end along dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10+
    gather(out, x, group=group)
    return out if dim == 0 else torch.cat(out.chunk(n, dim=0), dim=dim)


def heads_to_sequence(x: Tensor, group) -> Tensor:
    """Ulysses' first all-to-all: [..., B, H, c, D] (all heads, my tokens) -> [..., B, H/U, U c, D] (my heads, the
    tokens of the whole group, in group rank order)."""
    u = dist.get_world_size(group)
    *lead, b, h, c, d = x.shape
    n_lead = len(lead)
    x = x.reshape(*lead, b, u, h // u, c, d)
    send = x.movedim(n_lead + 1, 0).contiguous()  # [U (destination), ..., B, H/U, c, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[m] = peer m's tokens of my heads -> [..., B, H/U, U, c, D] -> [..., B, H/U, U c, D]
    return recv.movedim(0, n_lead + 2).reshape(*lead, b, h // u, u * c, d)


def sequence_to_heads(x: Tensor, group) -> Tensor:
    """The inverse all-to-all: [B, H/U, U c, D] -> [B, H, c, D]."""
    u = dist.get_world_size(group)
    b, hu, uc, d = x.shape
    c = uc // u
    send = x.reshape(b, hu, u, c, d).movedim(2, 0).contiguous()  # [U (destination = owner of the tokens), B, H/U, c, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[m] = head group m of my tokens -> [B, U, H/U, c, D] -> [B, H, c, D]
    return recv.movedim(0, 1).reshape(b, hu * u, c, d)


# ---------------------------------------------------------------------------------------------
# The transformer hook


class SequenceParallel:
    """Splits the block stack's video tokens over the sequence group and gathers them back.

    Set as ``model.sequence_parallel`` (see :meth:`hunyuan_i2v.parallel.Parallel.attach`); the transformer calls
    :meth:`split` before its blocks and :meth:`gather` after them. ``inner_backend`` names the attention backend
    for the local attention of Ulysses without a ring (None: the model's own setting).
    """

    def __init__(self, mesh: "Parallel", inner_backend: Optional[str] = None):
        self.mesh = mesh
        self.degree = mesh.config.sequence_degree
        self.inner_backend = inner_backend

    def split(self, inputs: "BlockStackInputs") -> "BlockStackInputs":
        """This rank's share of ``inputs``: its chunk of the video tokens (a copy) and RoPE rows, its count of
        frame-0 tokens (token_replace), and the sequence-parallel attention in place of the backend name. Takes the
        token streams out of ``inputs``, as the block stack does."""
        if torch.is_grad_enabled():
            raise RuntimeError("sequence parallelism is for inference: run the transformer under torch.no_grad()")
        img, txt = inputs.img, inputs.txt
        inputs.img = inputs.txt = None
        n = img.shape[1]
        c, _ = chunk_layout(n, self.degree)
        start = self.mesh.sp_index * c
        text_valid = None
        if inputs.mask is not None:
            text_valid = inputs.mask[:, 0, 0, n:].expand(img.shape[0], -1)  # the image part of the mask is all True
        inner = self.inner_backend if self.inner_backend is not None else inputs.opts.attention_backend
        attn = SequenceAttention(self.mesh, n, c, text_valid, inner)
        return dataclasses.replace(
            inputs, img=take_rows(img, start, c), txt=txt, rope=local_rope(inputs.rope, start, c),
            n_first=min(max(inputs.n_first - start, 0), c), mask=None,
            opts=dataclasses.replace(inputs.opts, attention_backend=attn))

    def gather(self, img: Tensor, inputs: "BlockStackInputs") -> Tensor:
        """Every rank's video tokens [B, c, hidden] -> all of them [B, N, hidden] on every rank, padding dropped."""
        n = math.prod(inputs.grid)
        return all_gather_cat(img, self.mesh.sp_group, dim=1)[:, :n]


class SequenceAttention:
    """The attention backend of one sequence-parallel forward: called by the blocks as ``(q, k, v, mask)`` with
    q/k/v [B, H, c + L, D] = [my video chunk | the whole text] (the last single block passes video queries only).
    ``mask`` is ignored: the padding is known here (video keys past ``n_tokens``, text keys where ``text_valid``
    is False)."""

    def __init__(self, mesh: "Parallel", n_tokens: int, chunk: int, text_valid: Optional[Tensor],
                 inner_backend: Optional[str]):
        self.mesh, self.n_tokens, self.chunk = mesh, n_tokens, chunk
        self.text_valid = None if text_valid is None or bool(text_valid.all()) else text_valid
        self.inner_backend = inner_backend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        mesh, c = self.mesh, self.chunk
        u_size, h = mesh.config.ulysses, q.shape[1]
        qi, ki, vi = q[:, :, :c], k[:, :, :c], v[:, :, :c]
        qt = q[:, :, c:] if q.shape[2] > c else None
        kt, vt = k[:, :, c:], v[:, :, c:]
        if u_size > 1:
            qi, ki, vi = heads_to_sequence(torch.stack([qi, ki, vi]), mesh.ulysses_group).unbind(0)
            heads = slice(mesh.ulysses_index * h // u_size, (mesh.ulysses_index + 1) * h // u_size)
            qt = qt[:, heads] if qt is not None else None
            kt, vt = kt[:, heads], vt[:, heads]
        if mesh.config.ring > 1:
            out_img, out_txt = self._ring(qi, ki, vi, qt, kt, vt)
        else:
            out_img, out_txt = self._local(qi, ki, vi, qt, kt, vt)
        if u_size > 1:
            out_img = sequence_to_heads(out_img, mesh.ulysses_group)
            out_txt = all_gather_cat(out_txt, mesh.ulysses_group, dim=1) if out_txt is not None else None
        return out_img if out_txt is None else torch.cat([out_img, out_txt], dim=2)

    def _span_valid(self, span: int, length: int, device) -> Optional[Tensor]:
        """Which of the ``length`` video keys of ring span ``span`` are real tokens; None when all are."""
        first = span * length
        if first + length <= self.n_tokens:
            return None
        return torch.arange(first, first + length, device=device) < self.n_tokens

    def _local(self, qi, ki, vi, qt, kt, vt) -> tuple[Tensor, Optional[Tensor]]:
        """Ulysses alone: this rank has every video token for its heads; one ordinary attention call."""
        n_q = qi.shape[2]
        q = qi if qt is None else torch.cat([qi, qt], dim=2)
        k, v = torch.cat([ki, kt], dim=2), torch.cat([vi, vt], dim=2)
        img_valid = self._span_valid(0, ki.shape[2], q.device)
        mask = None
        if img_valid is not None or self.text_valid is not None:
            b = q.shape[0]
            img_part = (img_valid if img_valid is not None else torch.ones(ki.shape[2], dtype=torch.bool,
                                                                           device=q.device)).expand(b, -1)
            txt_part = self.text_valid if self.text_valid is not None else torch.ones(
                b, kt.shape[2], dtype=torch.bool, device=q.device)
            mask = torch.cat([img_part, txt_part], dim=1)[:, None, None, :]
        out = attention(q, k, v, mask, backend=self.inner_backend)
        return out[:, :, :n_q], (out[:, :, n_q:] if qt is not None else None)

    def _ring(self, qi, ki, vi, qt, kt, vt) -> tuple[Tensor, Optional[Tensor]]:
        """Ring attention: the video k/v spans circulate; partial results merge by log-sum-exp."""
        mesh = self.mesh
        r_size, r = mesh.config.ring, mesh.ring_index
        n_q = qi.shape[2]
        q = qi if qt is None else torch.cat([qi, qt], dim=2)
        kv = torch.stack([ki, vi]).contiguous()
        span_len = kv.shape[3]
        nxt, prev = mesh.ring_ranks[(r + 1) % r_size], mesh.ring_ranks[(r - 1) % r_size]
        out_img = lse_img = None
        txt_parts: list[Optional[tuple[Tensor, Tensor]]] = [None] * r_size
        for step in range(r_size):
            span = (r - step) % r_size  # whose video k/v this rank holds now
            pending, incoming = [], None
            if step < r_size - 1:  # pass the span on while computing on it
                incoming = torch.empty_like(kv)
                pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, mesh.ring_group),
                                                  dist.P2POp(dist.irecv, incoming, prev, mesh.ring_group)])
            o, lse = attention_with_lse(q, kv[0], kv[1], self._span_valid(span, span_len, q.device))
            if out_img is None:
                out_img, lse_img = o[:, :, :n_q].clone(), lse[:, :, :n_q].clone()
            else:
                merge_partials(out_img, lse_img, o[:, :, :n_q], lse[:, :, :n_q])
            if qt is not None:
                txt_parts[span] = (o[:, :, n_q:], lse[:, :, n_q:])
            del o, lse
            for work in pending:
                work.wait()
            if incoming is not None:
                kv = incoming
        # the text keys: on every rank already, attended once here
        o, lse = attention_with_lse(q, kt, vt, self.text_valid)
        merge_partials(out_img, lse_img, o[:, :, :n_q], lse[:, :, :n_q])
        out_txt = None
        if qt is not None:
            out_txt, lse_txt = txt_parts[0]
            for part_out, part_lse in txt_parts[1:] + [(o[:, :, n_q:], lse[:, :, n_q:])]:
                merge_partials(out_txt, lse_txt, part_out, part_lse)
            out_txt = out_txt.to(q.dtype)
        return out_img.to(q.dtype), out_txt
