"""Model configurations: frozen dataclasses and named presets.

A model is built from its config alone. The numbers of the 13B preset are those of the official
``HYVideo-T/2`` I2V checkpoint (spec section 1.1) and the ``884-16c-hy`` VAE (spec section 3.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

ConditionType = Optional[Literal["token_replace", "latent_concat"]]


@dataclass(frozen=True)
class TransformerConfig:
    """The dual-stream -> single-stream diffusion transformer (HYVideo-T/2)."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    depth_double: int = 20
    depth_single: int = 40
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # (t, h, w), sums to head_dim
    rope_theta: float = 256.0
    text_states_dim: int = 4096  # MLLM hidden size
    text_states_dim_2: int = 768  # CLIP pooled size
    refiner_depth: int = 2
    guidance_embed: bool = True
    condition_type: ConditionType = "token_replace"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must sum to head_dim {self.head_dim}")
        if self.condition_type not in (None, "token_replace", "latent_concat"):
            raise ValueError(f"unknown condition_type {self.condition_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class VAEConfig:
    """The 3D causal VAE ("884-16c-hy"): 8x spatial, 4x temporal compression."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    spatial_compression: int = 8
    temporal_compression: int = 4
    scaling_factor: float = 0.476986
    mid_block_add_attention: bool = True

    # Official tiling (spec section 3.4): tile sizes in pixels / frames, overlap factor 0.25.
    tile_sample_size: int = 256
    tile_sample_frames: int = 64
    tile_overlap: float = 0.25

    def __post_init__(self) -> None:
        n_down = len(self.block_out_channels) - 1
        if 2**n_down < self.spatial_compression:
            raise ValueError(
                f"{len(self.block_out_channels)} blocks cannot compress space by {self.spatial_compression}"
            )

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1


@dataclass(frozen=True)
class PromptTemplate:
    """An MLLM chat template and the token positions the crop relies on (spec section 2.1)."""

    template: str
    crop_start: int  # tokens before the user text, counting BOS and <image> as one each
    image_emb_start: int = 5
    image_emb_end: int = 581
    image_emb_len: int = 576
    double_return_token_id: int = 271  # "\n\n" in the Llama-3 vocabulary


I2V_VIDEO_TEMPLATE = PromptTemplate(
    template=(
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
        "aspects according to the reference image: 1. The main content and theme of the video.2. The color, "
        "shape, size, texture, quantity, text, and spatial relationships of the objects.3. Actions, events, "
        "behaviors temporal relationships, physical movement changes of the objects.4. background environment, "
        "light, style and atmosphere.5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "\n\n<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n"
    ),
    crop_start=103,
)

I2V_IMAGE_TEMPLATE = PromptTemplate(
    template=(
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the image by detailing the color, shape, "
        "size, texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    crop_start=36,
)

DEFAULT_NEGATIVE_PROMPT = "deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs"


@dataclass(frozen=True)
class TextEncoderConfig:
    """How prompts become the transformer's text stream (MLLM) and pooled vector (CLIP-L)."""

    kind: Literal["llava-clip", "minilm"] = "llava-clip"
    template: PromptTemplate = I2V_VIDEO_TEMPLATE
    text_len: int = 256  # tokens after crop_start before cropping; 252 survive the crop
    hidden_state_skip_layer: int = 2  # hidden_states[-(skip + 1)]
    image_embed_interleave: int = 4  # 576 image tokens -> 144 (token_replace); 2 for latent_concat
    clip_max_length: int = 77


@dataclass(frozen=True)
class SamplerDefaults:
    steps: int = 50
    flow_shift: float = 17.0  # dynamic; 7.0 together with stability
    stability_flow_shift: float = 7.0
    embedded_guidance: float = 6.0
    num_frames: int = 129
    fps: int = 24
    resolution: str = "720p"  # size bucket family when the user gives none
    height: Optional[int] = None  # a fixed default size instead of a bucket (the demo model)
    width: Optional[int] = None
    cfg_scale: float = 1.0  # real classifier-free guidance (the 13B model is guidance-distilled)
    negative_prompt: Optional[str] = None  # None: the official default negative prompt


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a complete image-to-video model."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Presets

HUNYUAN_I2V_720P = ModelConfig(
    name="hunyuan-i2v-720p",
    transformer=TransformerConfig(),
    vae=VAEConfig(),
)

# The first-day weights (2025-03-06): 33 input channels, no guidance embedding, 288 image tokens.
HUNYUAN_I2V_33CH = ModelConfig(
    name="hunyuan-i2v-33ch",
    transformer=TransformerConfig(in_channels=33, guidance_embed=False, condition_type="latent_concat"),
    vae=VAEConfig(),
    text=TextEncoderConfig(image_embed_interleave=2),
)

# Small random-weight configs for tests: same code paths, seconds on a CPU.
TINY_TRANSFORMER = TransformerConfig(
    hidden_size=64,
    num_heads=2,
    depth_double=2,
    depth_single=2,
    rope_axes_dim=(8, 12, 12),
    text_states_dim=32,
    text_states_dim_2=16,
    refiner_depth=2,
)
TINY_VAE = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4)

TINY_TEST = ModelConfig(name="tiny-test", transformer=TINY_TRANSFORMER, vae=TINY_VAE)
TINY_TEST_33CH = ModelConfig(
    name="tiny-test-33ch",
    transformer=dataclasses.replace(
        TINY_TRANSFORMER, in_channels=2 * TINY_VAE.latent_channels + 1, out_channels=TINY_VAE.latent_channels,
        guidance_embed=False, condition_type="latent_concat",
    ),
    vae=TINY_VAE,
    text=TextEncoderConfig(image_embed_interleave=2),
)
TINY_TEST = ModelConfig(
    name="tiny-test",
    transformer=dataclasses.replace(
        TINY_TRANSFORMER, in_channels=TINY_VAE.latent_channels, out_channels=TINY_VAE.latent_channels
    ),
    vae=TINY_VAE,
)

# The bundled demo model: the same classes at a size a laptop CPU trains and runs (see docs/tiny-model.md).
# 64x64 px, 33 frames at 8 fps. VAE with 4x spatial, 4x temporal compression and 8 latent channels: on the
# demo data an 8x one plateaued near 17 dB held-out PSNR. The DiT takes 1x4x4 latent patches, so a latent frame
# is 4x4 = 16 tokens, as with an 8x VAE and the official 1x2x2 patches, and training steps stay cheap; 2 double +
# 3 single blocks keep VAE + DiT under 25 MB in fp16. MiniLM prompt encoder; real CFG, no guidance embedding
# (nothing to distil from). scaling_factor is measured after VAE training.
TINY_DEMO = ModelConfig(
    name="hunyuan-i2v-tiny",
    transformer=TransformerConfig(
        in_channels=8, out_channels=8, patch_size=(1, 4, 4), hidden_size=256, num_heads=4, depth_double=2,
        depth_single=3,
        rope_axes_dim=(16, 24, 24), text_states_dim=384, text_states_dim_2=384, refiner_depth=1,
        guidance_embed=False, condition_type="token_replace",
    ),
    vae=VAEConfig(
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=8,
        spatial_compression=4, temporal_compression=4, scaling_factor=1.0,
    ),
    text=TextEncoderConfig(kind="minilm", text_len=32, image_embed_interleave=1),
    sampler=SamplerDefaults(
        steps=20, flow_shift=3.0, stability_flow_shift=3.0, embedded_guidance=1.0, num_frames=33, fps=8,
        height=64, width=64, cfg_scale=3.0, negative_prompt="",
    ),
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (HUNYUAN_I2V_720P, HUNYUAN_I2V_33CH, TINY_TEST, TINY_TEST_33CH, TINY_DEMO)
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------------------------------------
# (De)serialisation, for model.json files


def model_config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def _build(cls, data: dict):
    """Instantiate a (nested) config dataclass from plain data, turning lists back into tuples."""
    kwargs = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_NESTED = {
    (ModelConfig, "transformer"): TransformerConfig,
    (ModelConfig, "vae"): VAEConfig,
    (ModelConfig, "text"): TextEncoderConfig,
    (ModelConfig, "sampler"): SamplerDefaults,
    (TextEncoderConfig, "template"): PromptTemplate,
}


def model_config_from_dict(data: dict) -> ModelConfig:
    """Inverse of :func:`model_config_to_dict`; missing fields take their defaults."""
    return _build(ModelConfig, data)
