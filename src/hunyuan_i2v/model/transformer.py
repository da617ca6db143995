"""HYVideo-T/2: the dual-stream -> single-stream diffusion transformer of HunyuanVideo-I2V (spec section 1).

Data flow: latent video [B, C, T, H, W] -> patch tokens; MLLM states -> token refiner; timestep, guidance and the
CLIP pooled vector -> ``vec``, which drives every adaLN modulation. 20 double-stream blocks keep separate weights
for image and text tokens and attend jointly; 40 single-stream blocks run on the concatenation [image; text].

token_replace (the released I2V weights): the tokens of latent frame 0 hold the clean image latent and are
modulated with ``tr_vec = time_in(0) + vector_in(pooled)`` (no guidance term) instead of ``vec``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import TransformerConfig
from .layers import (
    MLP,
    MLPEmbedder,
    Modulation,
    PatchEmbed,
    RMSNorm,
    SingleTokenRefiner,
    TimestepEmbedder,
    apply_rope,
    attention,
    gelu_tanh,
    key_padding_mask,
    merge_heads,
    modulate,
    rope_frequencies,
    split_heads,
)


class FirstFrameSplit:
    """Modulation chunks for the first ``n`` tokens (token_replace) next to the chunks for all the others."""

    def __init__(self, chunks: Sequence[Tensor], tr_chunks: Optional[Sequence[Tensor]], n: int):
        self.chunks, self.tr_chunks, self.n = chunks, tr_chunks, n

    def modulate(self, x: Tensor, i_shift: int, i_scale: int) -> Tensor:
        shift, scale = self.chunks[i_shift], self.chunks[i_scale]
        if self.tr_chunks is None:
            return modulate(x, shift, scale)
        n = self.n
        head = modulate(x[:, :n], self.tr_chunks[i_shift], self.tr_chunks[i_scale])
        return torch.cat([head, modulate(x[:, n:], shift, scale)], dim=1)

    def gated_add(self, x: Tensor, y: Tensor, i_gate: int) -> Tensor:
        """x + gate * y, with the first-frame gate on the first n tokens."""
        gate = self.chunks[i_gate]
        if self.tr_chunks is None:
            return torch.addcmul(x, y, gate)
        n = self.n
        head = torch.addcmul(x[:, :n], y[:, :n], self.tr_chunks[i_gate])
        return torch.cat([head, torch.addcmul(x[:, n:], y[:, n:], gate)], dim=1)


def _modulations(mod: Modulation, vec: Tensor, tr_vec: Optional[Tensor], n_first: int) -> FirstFrameSplit:
    return FirstFrameSplit(mod(vec), mod(tr_vec) if tr_vec is not None else None, n_first)


class DoubleStreamBlock(nn.Module):
    """MMDoubleStreamBlock (spec 1.4): per-stream weights, joint attention over [image; text]."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.num_heads = cfg.num_heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6, **kw))
            setattr(self, f"{s}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{s}_attn_qkv", nn.Linear(h, 3 * h, **kw))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(cfg.head_dim, **kw))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(cfg.head_dim, **kw))
            setattr(self, f"{s}_attn_proj", nn.Linear(h, h, **kw))
            setattr(self, f"{s}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{s}_mlp", MLP(h, cfg.mlp_hidden, gelu_tanh, **kw))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, tr_vec: Optional[Tensor], n_first: int,
                rope: tuple[Tensor, Tensor], mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        img_m = _modulations(self.img_mod, vec, tr_vec, n_first)
        txt_m = _modulations(self.txt_mod, vec, None, 0)

        iq, ik, iv = split_heads(self.img_attn_qkv(img_m.modulate(self.img_norm1(img), 0, 1)), self.num_heads)
        iq = apply_rope(self.img_attn_q_norm(iq), *rope)
        ik = apply_rope(self.img_attn_k_norm(ik), *rope)
        tq, tk, tv = split_heads(self.txt_attn_qkv(txt_m.modulate(self.txt_norm1(txt), 0, 1)), self.num_heads)
        tq, tk = self.txt_attn_q_norm(tq), self.txt_attn_k_norm(tk)

        out = attention(torch.cat([iq, tq], 2), torch.cat([ik, tk], 2), torch.cat([iv, tv], 2), mask)
        del iq, ik, iv, tq, tk, tv
        n_img = img.shape[1]
        img_attn, txt_attn = merge_heads(out[:, :, :n_img]), merge_heads(out[:, :, n_img:])
        del out

        img = img_m.gated_add(img, self.img_attn_proj(img_attn), 2)
        img = img_m.gated_add(img, self.img_mlp(img_m.modulate(self.img_norm2(img), 3, 4)), 5)
        txt = txt_m.gated_add(txt, self.txt_attn_proj(txt_attn), 2)
        txt = txt_m.gated_add(txt, self.txt_mlp(txt_m.modulate(self.txt_norm2(txt), 3, 4)), 5)
        return img, txt


class SingleStreamBlock(nn.Module):
    """MMSingleStreamBlock (spec 1.5): one fused linear for qkv and the MLP, parallel attention + MLP."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.num_heads = cfg.num_heads
        self.hidden_size, self.mlp_hidden = h, cfg.mlp_hidden
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden, **kw)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h, **kw)
        self.q_norm = RMSNorm(cfg.head_dim, **kw)
        self.k_norm = RMSNorm(cfg.head_dim, **kw)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw)
        self.modulation = Modulation(h, 3, **kw)

    def forward(self, x: Tensor, n_img: int, vec: Tensor, tr_vec: Optional[Tensor], n_first: int,
                rope: tuple[Tensor, Tensor], mask: Optional[Tensor]) -> Tensor:
        m = _modulations(self.modulation, vec, tr_vec, n_first)
        qkv, mlp = self.linear1(m.modulate(self.pre_norm(x), 0, 1)).split([3 * self.hidden_size, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        del qkv
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([apply_rope(q[:, :, :n_img], *rope), q[:, :, n_img:]], dim=2)
        k = torch.cat([apply_rope(k[:, :, :n_img], *rope), k[:, :, n_img:]], dim=2)
        attn = merge_heads(attention(q, k, v, mask))
        del q, k, v
        return m.gated_add(x, self.linear2(torch.cat([attn, gelu_tanh(mlp)], dim=-1)), 2)


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN (shift, scale) from ``vec`` -> Linear to patch values (spec 1.6)."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw)
        pt, ph, pw = cfg.patch_size
        self.linear = nn.Linear(h, pt * ph * pw * cfg.out_channels, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, **kw))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x.to(self.linear.weight.dtype))


class HunyuanVideoTransformer(nn.Module):
    """The HunyuanVideo(-I2V) diffusion transformer; state dict keys are the official ones."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(device=device, dtype=dtype)
        h = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.patch_size, cfg.in_channels, h, **kw)
        self.txt_in = SingleTokenRefiner(cfg.text_states_dim, h, cfg.num_heads, cfg.refiner_depth, cfg.mlp_ratio, **kw)
        self.time_in = TimestepEmbedder(h, **kw)
        self.vector_in = MLPEmbedder(cfg.text_states_dim_2, h, **kw)
        self.guidance_in = TimestepEmbedder(h, **kw) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg, **kw) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg, **kw) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(cfg, **kw)
        self.gradient_checkpointing = False
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.proj.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache.clear()
            self._rope_cache[key] = rope_frequencies(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        return self._rope_cache[key]

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, N, C*pt*ph*pw] (channel slowest) -> [B, C, T, H, W]."""
        (t, h, w), (pt, ph, pw) = grid, self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(x.shape[0], t, h, w, c, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], c, t * pt, h * ph, w * pw)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_states: Tensor,
        text_mask: Optional[Tensor],
        text_states_2: Tensor,
        guidance: Optional[Tensor] = None,
    ) -> Tensor:
        """Predict the flow velocity.

        x: [B, C_in, T, H, W] latents (for latent_concat, already the 33-channel input); t: [B] in 0..1000;
        text_states: [B, L, text_states_dim]; text_mask: [B, L] (1 = valid, right padded); text_states_2: [B, 768];
        guidance: [B] = embedded guidance scale x 1000 (required when the model has guidance_in).
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected latents [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        _, _, T, H, W = x.shape
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent size {(T, H, W)} is not divisible by the patch size {cfg.patch_size}")
        grid = (T // pt, H // ph, W // pw)
        b = x.shape[0]
        t = t.expand(b) if t.numel() == 1 else t

        vec = self.time_in(t) + self.vector_in(text_states_2.to(self.dtype))
        tr_vec, n_first = None, 0
        if cfg.condition_type == "token_replace":
            tr_vec = self.time_in(torch.zeros_like(t)) + self.vector_in(text_states_2.to(self.dtype))
            n_first = grid[1] * grid[2]
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass guidance = scale x 1000 (e.g. 6000.0)")
            guidance = guidance.expand(b) if guidance.numel() == 1 else guidance
            vec = vec + self.guidance_in(guidance)

        img = self.img_in(x.to(self.dtype))
        txt = self.txt_in(text_states.to(self.dtype), t, text_mask)
        n_img = img.shape[1]
        rope = self.rope(grid, x.device)
        mask = key_padding_mask(n_img, text_mask) if text_mask is not None else None

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, tr_vec, n_first, rope, mask)
        x_joint = torch.cat([img, txt], dim=1)
        del img, txt
        for block in self.single_blocks:
            x_joint = self._run(block, x_joint, n_img, vec, tr_vec, n_first, rope, mask)

        out = self.final_layer(x_joint[:, :n_img], vec)
        return self.unpatchify(out, grid)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
