"""The flow-matching schedule and sampler against worked values and diffusers' scheduler."""

import pytest
import torch

from hunyuan_i2v.config import TINY_TEST
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
from hunyuan_i2v.sampling import (
    TextConditioning,
    denoise,
    euler_step,
    get_sigmas,
    guidance_tensor,
    latent_concat_input,
    shift_sigmas,
    timesteps_from_sigmas,
)


def test_worked_example_four_steps_shift_7():
    t = timesteps_from_sigmas(get_sigmas(4, 7.0))
    assert torch.allclose(t, torch.tensor([1000.0, 954.5454545, 875.0, 700.0]), atol=1e-3)


def test_shift_formula_and_endpoints():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 17.0), torch.tensor([0.0, 17 * 0.5 / (1 + 16 * 0.5), 1.0]))
    sig = get_sigmas(50, 17.0)
    assert sig.shape == (51,) and sig[0] == 1.0 and sig[-1] == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    with pytest.raises(ValueError):
        get_sigmas(0, 7.0)


@pytest.mark.parametrize("steps,shift", [(4, 7.0), (50, 17.0), (30, 1.0)])
def test_sigmas_equal_diffusers_scheduler(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
    ours = get_sigmas(steps, shift)
    assert torch.allclose(sched.sigmas.float(), ours, atol=1e-6)
    assert torch.allclose(sched.timesteps.float(), timesteps_from_sigmas(ours), atol=1e-3)
    x, v = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    expected = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    assert torch.allclose(euler_step(x, v, ours[0], ours[1]), expected, atol=1e-6)


def test_guidance_is_bf16_rounded_like_the_official_pipeline():
    assert guidance_tensor(6.0, 2).tolist() == [6016.0, 6016.0]
    assert guidance_tensor(6.0, 1, bf16_round=False).item() == 6000.0
    assert guidance_tensor(1.0, 1).item() == 1000.0


def _text(b=1):
    return TextConditioning(torch.randn(b, 6, 32), torch.ones(b, 6), torch.randn(b, 16))


def test_token_replace_keeps_frame_zero_and_integrates_the_rest():
    velocity = torch.randn(1, 4, 3, 4, 4)
    seen = []

    def model(x, t, *args, guidance=None):
        seen.append(x[:, :, 0].clone())
        return velocity

    noise, image = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 1, 4, 4)
    out = denoise(model, noise, image, _text(), get_sigmas(5, 7.0))
    assert torch.equal(out[:, :, :1], image)
    assert all(torch.equal(s, image[:, :, 0]) for s in seen)  # the model always sees the clean image in frame 0
    # constant velocity: sum of the steps is v * (0 - 1)
    assert torch.allclose(out[:, :, 1:], noise[:, :, 1:] - velocity[:, :, 1:], atol=1e-5)


def test_latent_concat_input_layout():
    lat, img = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 1, 2, 2)
    x = latent_concat_input(lat, img)
    assert x.shape == (1, 9, 3, 2, 2)
    assert torch.equal(x[:, :4], lat) and torch.equal(x[:, 4:8, 0], img[:, :, 0])
    assert x[:, 4:8, 1:].abs().sum() == 0
    assert x[:, 8, 0].eq(1).all() and x[:, 8, 1:].eq(0).all()


def test_cfg_batch_equals_separate_passes():
    model = HunyuanVideoTransformer(TINY_TEST.transformer).eval()
    cond, uncond = _text(), _text()
    noise, image = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 1, 4, 4)
    sigmas, g = get_sigmas(2, 7.0), guidance_tensor(6.0, 1)
    with torch.no_grad():
        out = denoise(model, noise, image, cond, sigmas, guidance=g, uncond=uncond, cfg_scale=3.0)
        # by hand
        x = noise.clone()
        x[:, :, :1] = image
        for i in range(2):
            t = torch.full((1,), float(sigmas[i]) * 1000)
            vc = model(x, t, cond.text_states, cond.text_mask, cond.text_states_2, guidance=g)
            vu = model(x, t, uncond.text_states, uncond.text_mask, uncond.text_states_2, guidance=g)
            v = vu + 3.0 * (vc - vu)
            x[:, :, 1:] = x[:, :, 1:] + v[:, :, 1:] * (sigmas[i + 1] - sigmas[i])
        plain = denoise(model, noise, image, cond, sigmas, guidance=g)
    assert torch.allclose(out, x, atol=1e-5)
    assert (out - plain).abs().max() > 1e-4  # guidance did something
