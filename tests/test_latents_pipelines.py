"""The latent spaces against real (tiny, offline) diffusers pipelines: PiD's baseline decode of a pipeline's
`output_type="latent"` result equals the image the pipeline decodes itself."""

import pytest
import torch

import pid.latents as latents
from pid.latents.base import AffineLatentSpace

from tiny_pipelines import make_tiny_pipeline, tiny_call_kwargs


@pytest.mark.parametrize(
    "backbone", ["flux", "zimage-turbo", "sd3", "sdxl", "flux2", "flux2-klein-4b", "qwenimage"]
)
def test_baseline_decode_equals_the_pipelines_own_decode(backbone):
    pipe = make_tiny_pipeline(backbone, fresh=True)
    space = latents.get(backbone)
    if isinstance(space, AffineLatentSpace) and not backbone.startswith("zimage"):
        # PiD's space has fixed constants; give the tiny VAE the same ones so the pipeline decodes alike
        pipe.vae.register_to_config(scaling_factor=space.scaling_factor, shift_factor=space.shift_factor)
    space.from_pipeline(pipe)
    kwargs = tiny_call_kwargs(backbone, prompt="a red cube", num_inference_steps=1)
    latent = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    z = space.from_pipeline_latent(latent, kwargs["height"], kwargs["width"])
    assert z.ndim == 4 and z.shape[1] == space.channels
    assert z.shape[-1] * space.downsample == kwargs["width"]
    if latent.ndim == 3:  # packed layouts round-trip
        torch.testing.assert_close(space.to_pipeline_latent(z), latent, rtol=0, atol=0)
    torch.testing.assert_close(space.decode(z) * 0.5 + 0.5, image, atol=2e-5, rtol=1e-4)
