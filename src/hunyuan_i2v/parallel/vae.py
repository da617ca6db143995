"""The VAE's tiled decode shared by several processes: each decodes a share of the tiles, one assembles them.

The tiles of a tiled decode (:meth:`CausalVAE.decode_windows`: temporal windows, each cut into overlapping
spatial tiles) run through the decoder independently; only the cross-fades that follow join them, and those are
cheap. So the tiles are dealt out round-robin (tile i to the i-th process of the group modulo its size) and
decoded in rounds, one tile per process per round; after each round the tiles go to the destination process,
which blends them exactly as the single-process decode does (the same assembly code, fed the received tiles), so
the video equals the single-process tiled decode up to the decoder's own float rounding.

Every process must pass the same latents (in a multi-process generation they are: every rank ends the denoising
loop with identical latents). The tiling settings are the destination's (broadcast first). Each round ends with
a small all-reduce of a status flag, so a process that fails on its tile, or a destination that stops reading
the stream, makes every process raise instead of waiting for a tile that never comes.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .mesh import ParallelError

logger = logging.getLogger(__name__)

_OK, _FAILED, _ABANDONED = 0, 1, 2  # a process's status in a round


class ParallelDecode:
    """The decoded video's chunks on the destination process, as :meth:`CausalVAE.decode_stream` yields them;
    an empty iterator elsewhere (those processes did their share when it was made).

    Read it to the end, or :meth:`close` it: the other processes wait on the destination's rounds.
    """

    def __init__(self, vae, latents: Tensor, group=None, *, dst: int = 0, tiled: Optional[bool] = None,
                 lean: bool = False, chunk_frames: Optional[int] = None, tile_sample_size: Optional[int] = None,
                 tile_sample_frames: Optional[int] = None):
        self.vae, self.group, self.dst = vae, group, dst
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if dst not in self.ranks:
            raise ValueError(f"the destination rank {dst} is not in the group {self.ranks}")
        self.rank = dist.get_rank()
        vae._check_latents(latents)
        settings = [dict(tiled=tiled, lean=lean, chunk_frames=chunk_frames, tile_sample_size=tile_sample_size,
                         tile_sample_frames=tile_sample_frames, shape=tuple(latents.shape))]
        dist.broadcast_object_list(settings, src=dst, group=group)  # the destination's tiling for everyone
        self.settings = settings[0]
        if self.settings["shape"] != tuple(latents.shape):
            raise ParallelError(f"rank {self.rank} has latents {tuple(latents.shape)}, the destination "
                                f"{self.settings['shape']}: every process must pass the same latents")
        self.latents = latents.to(vae.dtype)
        sizes = {k: self.settings[k] for k in ("tiled", "tile_sample_size", "tile_sample_frames")}
        self.windows = vae.decode_windows(self.latents.shape, **sizes)
        # the destination deals the first tile of each round to itself, then the others in group order
        self.order = [dst] + [r for r in self.ranks if r != dst]
        self.rounds = -(-len(self.windows) // len(self.order))
        self.round = 0  # rounds done
        self.decoded = 0  # tiles this process decoded (for tests and logs)
        self._chunks: Optional[Iterator[Tensor]] = None
        self._closed = False
        device = latents.device if dist.get_backend(group) != "nccl" else torch.device("cuda", torch.cuda.current_device())
        self._status = torch.zeros(len(self.order), dtype=torch.int32, device=device)
        if self.rank == dst:
            self._chunks = vae.decode_stream(self.latents, tiles=self._tiles(), **sizes)
        else:
            self._serve()

    # -- one round -------------------------------------------------------------------------------

    def _mine(self, k: int) -> Optional[int]:
        """The index of this process's tile in round k, or None when it has none."""
        i = k * len(self.order) + self.order.index(self.rank)
        return i if i < len(self.windows) else None

    def _decode(self, i: int) -> Tensor:
        frames, rows, cols = self.windows[i]
        self.decoded += 1
        s = self.settings
        return self.vae._decode_tile(self.latents[:, :, frames, rows, cols], lean=s["lean"],
                                     chunk_frames=s["chunk_frames"])

    def _agree(self, status: int) -> None:
        """The round's status of every process (one all-reduce); raise on every process if one is not ok."""
        self._status.zero_()
        self._status[self.order.index(self.rank)] = status
        dist.all_reduce(self._status, group=self.group)
        self.round += 1
        codes = self._status.tolist()
        if any(codes):
            self._closed = True
            failed = [self.order[j] for j, c in enumerate(codes) if c == _FAILED]
            if failed:
                raise ParallelError(f"rank {failed[0]} failed to decode its VAE tile (round {self.round} of "
                                    f"{self.rounds}); see its log")
            raise ParallelError(f"rank {self.dst} stopped reading the decoded video; the other processes stop too")

    def _decode_round(self) -> Optional[Tensor]:
        """This process's tile of the next round (None if it has none), once every process has its own."""
        i = self._mine(self.round)
        try:
            tile = self._decode(i) if i is not None else None
        except BaseException:
            try:
                self._agree(_FAILED)
            except ParallelError:
                pass  # the others know; this process raises its own error
            raise
        self._agree(_OK)
        return tile

    # -- the other processes ---------------------------------------------------------------------

    def _serve(self) -> None:
        pending = None  # (work, tile): the tile in flight to the destination while the next one decodes
        try:
            while self.round < self.rounds:
                tile = self._decode_round()
                if pending is not None:
                    pending[0].wait()
                pending = None
                if tile is not None:
                    tile = tile.contiguous()
                    pending = (dist.isend(tile, self.dst, group=self.group), tile)
            if pending is not None:
                pending[0].wait()
        finally:
            self._closed = True
        logger.debug("rank %d decoded %d of %d VAE tiles", self.rank, self.decoded, len(self.windows))

    # -- the destination -------------------------------------------------------------------------

    def _tiles(self) -> Iterator[Tensor]:
        """The tiles in window order: this process's own and those received, a round at a time."""
        while self.round < self.rounds:
            k = self.round
            own = self._decode_round()
            round_tiles = [own]
            for j, src in enumerate(self.order[1:], start=1):
                i = k * len(self.order) + j
                if i >= len(self.windows):
                    break
                frames, rows, cols = self.windows[i]
                shape = self.vae.decoded_shape(self.latents[:, :, frames, rows, cols].shape)
                buf = torch.empty(shape, dtype=own.dtype, device=own.device)
                dist.recv(buf, src, group=self.group)
                round_tiles.append(buf)
            yield from round_tiles
            del round_tiles, own
        self._closed = True

    def __iter__(self) -> "ParallelDecode":
        return self

    def __next__(self) -> Tensor:
        if self._chunks is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration:
            self._chunks = None
            raise

    def close(self) -> None:
        """Stop early (on the destination): the other processes are told at their next round and raise."""
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        if not self._closed and self.rank == self.dst and self.round < self.rounds:
            self._closed = True
            try:
                self._agree(_ABANDONED)
            except ParallelError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the process group may be gone at interpreter exit
            pass


def decode_stream_parallel(vae, latents: Tensor, group=None, **kwargs) -> ParallelDecode:
    """:meth:`CausalVAE.decode_stream` with the tiles decoded by every process of ``group`` (default: all); the
    chunks come out on ``dst`` (default rank 0), nothing elsewhere. Keywords: ``dst`` and those of
    decode_stream. Every process calls it with the same latents."""
    return ParallelDecode(vae, latents, group, **kwargs)


def decode_parallel(vae, latents: Tensor, group=None, **kwargs) -> Optional[Tensor]:
    """:meth:`CausalVAE.decode` with the tiles decoded by every process of ``group``: the video on ``dst``
    (default rank 0), None elsewhere."""
    stream = ParallelDecode(vae, latents, group, **kwargs)
    chunks = list(stream)
    if not chunks:
        return None
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
