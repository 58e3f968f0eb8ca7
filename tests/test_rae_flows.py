"""dinov2 (RAE) and siglip (Scale-RAE) LDM flows against fake upstream repositories built in tmp_path.

The fakes mimic the upstream interfaces rae_flows calls (names, signatures, return shapes), so the glue is
really exercised: sys.path handling, call arguments, trajectory slicing, labels, sigmas, captions, errors,
and one `from_ldm.run` per backbone with a tiny PiD decoder.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pid.checkpoints import lookup
from pid.decoder import PiDDecoder
from pid.errors import CheckpointNotFoundError, ConfigError
from pid.inference import rae_flows, scale_rae_flow
from pid.inference.from_ldm import load_config, plan_run, run

from tiny import tiny_caption_encoder, tiny_net
from tiny_vaes import tiny_vit_decoder_config, tiny_vit_decoder_state

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------------------------------------
# Fake upstream repositories
# ----------------------------------------------------------------------------------------------------------

FAKE_RAE = {
    "src/stage1/__init__.py": """
        import json, os
        import torch
        from torch import nn

        CALLS = []

        class RAE(nn.Module):
            def __init__(self, encoder_cls="Dinov2withNorm", encoder_config_path="facebook/dinov2-base",
                         encoder_input_size=224, encoder_params={}, decoder_config_path="vit_mae-base",
                         decoder_patch_size=16, pretrained_decoder_path=None, noise_tau=0.8, reshape_to_2d=True,
                         normalization_stat_path=None, eps=1e-5):
                super().__init__()
                with open(os.path.join(decoder_config_path, "config.json")) as f:
                    config = json.load(f)
                if not isinstance(config["patch_size"], int):  # transformers 5's strict config validation
                    raise ValueError("patch_size must be an int")
                CALLS.append(dict(encoder_cls=encoder_cls, encoder_config_path=encoder_config_path,
                                  encoder_input_size=encoder_input_size, encoder_params=encoder_params,
                                  decoder_config_path=decoder_config_path, decoder_config=config,
                                  pretrained_decoder_path=pretrained_decoder_path, noise_tau=noise_tau,
                                  reshape_to_2d=reshape_to_2d, normalization_stat_path=normalization_stat_path))
                torch.manual_seed(0)
                self.decoder = nn.Conv2d(768, 3, 1)
                stats = torch.load(normalization_stat_path)
                self.latent_mean, self.latent_var, self.eps = stats["mean"], stats["var"], eps
                self.encoder_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                self.encoder_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

            def decode(self, z):
                z = z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean
                x = nn.functional.interpolate(self.decoder(z), scale_factor=16, mode="nearest")
                return x * self.encoder_std + self.encoder_mean
    """,
    "src/stage2/__init__.py": "",
    "src/stage2/models/__init__.py": "",
    "src/stage2/models/DDT.py": """
        import torch
        from torch import nn

        INSTANCES = []

        class DiTwDDTHead(nn.Module):
            def __init__(self, input_size=1, patch_size=1, in_channels=768, hidden_size=[1152, 2048],
                         depth=[28, 2], num_heads=[16, 16], mlp_ratio=4.0, class_dropout_prob=0.1,
                         num_classes=1000, use_qknorm=False, use_swiglu=True, use_rope=True,
                         use_rmsnorm=True, wo_shift=False, use_pos_embed=True):
                super().__init__()
                self.kwargs = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                   hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                                   mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                                   num_classes=num_classes, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                                   use_rope=use_rope, use_rmsnorm=use_rmsnorm, wo_shift=wo_shift,
                                   use_pos_embed=use_pos_embed)
                self.in_channels = in_channels
                self.gain = nn.Parameter(torch.ones(1))
                self.class_embed = nn.Embedding(num_classes + 1, in_channels)
                self.calls = []
                INSTANCES.append(self)

            def forward(self, x, t, y):
                self.calls.append(dict(x=x.clone(), t=t.clone(), y=y.clone(),
                                       autocast=torch.is_autocast_enabled(x.device.type)))
                return -x * self.gain + 0.1 * self.class_embed(y)[:, :, None, None]

            def forward_with_autoguidance(self, x, t, y, cfg_scale, additional_model_forward, cfg_interval=(0, 1)):
                eps = self.forward(x, t, y)[:, : self.in_channels]
                ag_eps = additional_model_forward(x, t, y)[:, : self.in_channels]
                low, high = cfg_interval
                assert low < high
                inside = ((t >= low) & (t <= high)).view(-1, *[1] * (eps.ndim - 1))
                return torch.where(inside, ag_eps + cfg_scale * (eps - ag_eps), eps)
    """,
    "src/stage2/transport/__init__.py": """
        import torch

        CREATED = []

        class Transport:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                             sample_eps=None, time_dist_type="uniform", time_dist_shift=1.0):
            transport = Transport(path_type=path_type, prediction=prediction, time_dist_type=time_dist_type,
                                  time_dist_shift=time_dist_shift)
            CREATED.append(transport)
            return transport

        class Sampler:
            def __init__(self, transport):
                self.transport = transport

            def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False):
                self.ode_kwargs = dict(sampling_method=sampling_method, num_steps=num_steps, atol=atol,
                                       rtol=rtol, reverse=reverse)
                shift = self.transport.kwargs["time_dist_shift"]
                t = 1 - torch.linspace(0, 1 - 1 / 1000, num_steps)
                t = shift * t / (1 + (shift - 1) * t)

                def sample(x, model, **model_kwargs):
                    xs = [x]
                    for a, b in zip(t[:-1], t[1:]):
                        x = x + (b - a) * model(x, torch.ones(x.shape[0], device=x.device) * a, **model_kwargs)
                        xs.append(x)
                    return torch.stack(xs)

                sample.sampler = self
                return sample
    """,
}

FAKE_SCALE_RAE = {
    "scale_rae/__init__.py": "",
    "scale_rae/constants.py": "IMAGE_TOKEN_INDEX = -200\n",
    "scale_rae/utils.py": """
        STATE = {"disabled": False}

        def disable_torch_init():
            STATE["disabled"] = True
    """,
    "scale_rae/conversation.py": """
        class Conversation:
            def __init__(self, roles=("<|im_start|>user", "<|im_start|>assistant")):
                self.roles, self.messages = roles, []

            def copy(self):
                return Conversation(self.roles)

            def append_message(self, role, message):
                self.messages.append([role, message])

            def get_prompt(self):
                return "".join(f"{r}\\n{m}<|im_end|>\\n" if m is not None else f"{r}\\n" for r, m in self.messages)

        conv_templates = {"qwen_2": Conversation()}
    """,
    "scale_rae/mm_utils.py": """
        import torch

        PROMPTS = []

        def get_model_name_from_path(model_path):
            return model_path.strip("/").split("/")[-1]

        def tokenizer_image_token(prompt, tokenizer, image_token_index=-200, return_tensors=None):
            PROMPTS.append((prompt, image_token_index))
            ids = [ord(c) % 64 for c in prompt][:24]
            return torch.tensor(ids) if return_tensors == "pt" else ids
    """,
    "scale_rae/model/__init__.py": "",
    "scale_rae/model/diffusion_loss/__init__.py": "",
    "scale_rae/model/diffusion_loss/diffloss.py": """
        import torch
        from torch import nn

        class RectifiedFlow:
            def __init__(self, steps, step_type="euler"):
                self.used_timesteps = list(range(steps + 1))
                self.sampler_timesteps = [(i + 1) / (steps + 1) for i in range(steps + 1)]
                self.step_type = step_type
                self.step_fn = self.euler_forward

            def get_x_end(self, x_shape, device, dtype=torch.float32):
                return torch.randn(x_shape, device=device, dtype=dtype)

            def euler_forward(self, model, x_t, t_curr, t_next, denoised_fn, model_kwargs):
                pred = model(x_t, t_curr, **model_kwargs)
                return (x_t + (t_next - t_curr).view(-1, 1, 1, 1) * pred,)

            def p_sample_loop(self, model, shape, x_end=None, clip_denoised=False, denoised_fn=None,
                              cond_fn=None, model_kwargs=None, device=None, progress=False):
                x_t = (self.get_x_end(shape, device) if x_end is None else x_end).to(device)
                carry = (x_t,)
                for i in reversed(range(1, len(self.used_timesteps) - 1)):
                    t_curr = self.sampler_timesteps[self.used_timesteps[i]]
                    t_next = self.sampler_timesteps[self.used_timesteps[i - 1]]
                    t_curr = torch.tensor(t_curr).to(device).repeat(x_t.size(0)).to(x_t.dtype)
                    t_next = torch.tensor(t_next).to(device).repeat(x_t.size(0)).to(x_t.dtype)
                    carry = self.step_fn(model, *carry, t_curr, t_next, denoised_fn, model_kwargs)
                t_curr = self.sampler_timesteps[self.used_timesteps[-2]]
                t_next = self.sampler_timesteps[self.used_timesteps[-1]]
                t_curr = torch.tensor(t_curr).to(device).repeat(x_t.size(0)).to(x_t.dtype)
                t_next = torch.tensor(t_next).to(device).repeat(x_t.size(0)).to(x_t.dtype)
                carry = self.euler_forward(model, *carry, t_curr, t_next, denoised_fn, model_kwargs)
                return carry[0].clamp(-1, 1) if clip_denoised else carry[0]

        class Velocity(nn.Module):
            def forward(self, x, t, y):
                return -x + 0.01 * y.mean(-1).view(-1, 1, 1, 1)

            def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval):
                return self.forward(x, t, y)

        class FullSequenceRectifiedFlowProjector(nn.Module):
            def __init__(self, steps=4, normalize=True, channels=1152, grid=16):
                super().__init__()
                self.diffusion_channels, self.input_size = channels, grid
                self.inference_flow = RectifiedFlow(steps)
                self.model = Velocity()
                self.guidance_scale, self.use_cfg, self.cfg_interval = 1.0, False, (-1e4, 1e4)
                self.normalize_data = normalize
                self.register_buffer("data_mean", torch.full((channels,), 0.5))
                self.register_buffer("data_std", torch.full((channels,), 2.0))

            @torch.no_grad()
            def infer(self, z, x_end=None, guidance_level=None):
                if guidance_level is not None:
                    self.guidance_scale, self.use_cfg = guidance_level, guidance_level > 1.0
                shape = (z.shape[0], self.diffusion_channels, self.input_size, self.input_size)
                x_end = self.inference_flow.get_x_end(shape, device=z.device, dtype=z.dtype) if x_end is None else x_end
                if self.use_cfg:
                    x_end = torch.cat([x_end, x_end])
                    kwargs, fn = dict(y=z, cfg_scale=self.guidance_scale, cfg_interval=self.cfg_interval), self.model.forward_with_cfg
                else:
                    kwargs, fn = dict(y=z), self.model.forward
                samples = self.inference_flow.p_sample_loop(fn, shape, x_end, clip_denoised=False,
                                                            model_kwargs=kwargs, progress=False, device=z.device)
                if self.use_cfg:
                    samples, _ = samples.chunk(2)
                samples = samples.permute(0, 2, 3, 1).contiguous().view(samples.shape[0], -1, self.diffusion_channels)
                if self.normalize_data:
                    samples = samples * self.data_std + self.data_mean
                return samples

        class PerTokenProjector(FullSequenceRectifiedFlowProjector):
            pass
    """,
    "scale_rae/model/builder.py": """
        import torch
        from torch import nn
        from transformers import Qwen2Config, Qwen2Model

        from .diffusion_loss.diffloss import FullSequenceRectifiedFlowProjector

        CALLS = []
        OPTIONS = {"head": FullSequenceRectifiedFlowProjector, "empty": False}

        class Tokenizer:
            def convert_tokens_to_ids(self, token):
                return {"<im_start>": 61, "<im_end>": 62, "<|im_end|>": 63}[token]

        class ScaleRAEQwenForCausalLM(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)
                self.model = Qwen2Model(config)
                self.diff_head = OPTIONS["head"]()
                self.generate_calls = []

            @property
            def device(self):
                return next(self.parameters()).device

            def generate(self, input_ids, images=None, **kwargs):
                self.generate_calls.append(dict(input_ids=input_ids, images=images, **kwargs))
                # the stale (1, 1) mask Scale-RAE's greedy loop passes on every step
                hidden = self.model(input_ids=input_ids, attention_mask=torch.ones(1, 1, dtype=torch.long))
                if OPTIONS["empty"]:
                    return input_ids, torch.empty(0, 1152)
                z = hidden.last_hidden_state.mean(1)
                return input_ids, self.diff_head.infer(z, guidance_level=kwargs["guidance_level"])[0]

        def load_pretrained_model(model_path, model_base=None, model_name="", load_8bit=False, load_4bit=False,
                                  device_map="auto", device="cuda", use_flash_attn=False, **kwargs):
            CALLS.append(dict(model_path=model_path, model_base=model_base, model_name=model_name,
                              device_map=device_map, device=device, **kwargs))
            return Tokenizer(), ScaleRAEQwenForCausalLM().to(device), [], 2048
    """,
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def make_rae_repo(tmp_path: Path) -> Path:
    repo = write_tree(tmp_path / "RAE", FAKE_RAE)
    config_dir = repo / rae_flows.RAE_DECODER_CONFIG
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(
        json.dumps({"decoder_hidden_size": 1152, "patch_size": "SHOULD BE RELOADED"})
    )
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(1001, 768, generator=gen)
    for key, gain in (("dit_main_ckpt", 2.0), ("dit_guid_ckpt", 0.5)):
        path = repo / rae_flows.DIT_FILES[key]
        path.parent.mkdir(parents=True)
        state = {"gain": torch.tensor([gain]), "class_embed.weight": embed * gain}
        # the main file is a training checkpoint (EMA weights under "ema"), the guidance one a bare state dict
        torch.save(
            {"ema": state, "model": {"gain": torch.tensor([9.0])}} if key == "dit_main_ckpt" else state, path
        )
    return repo


def make_rae_weights(root: Path) -> Path:
    """PiD-style checkpoint folder holding the RAE decoder (unused by the fake RAE) and latent statistics."""
    decoder = root / "rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt"
    stats = root / "rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt"
    for path in (decoder, stats):
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, decoder)
    gen = torch.Generator().manual_seed(1)
    torch.save(
        {
            "mean": 0.1 * torch.randn(768, 32, 32, generator=gen),
            "var": torch.rand(768, 32, 32, generator=gen) + 0.5,
        },
        stats,
    )
    return root


def make_scale_rae_repo(tmp_path: Path, with_decoder: bool = True) -> Path:
    repo = write_tree(tmp_path / "Scale-RAE", FAKE_SCALE_RAE)
    if with_decoder:
        write_siglip_decoder(
            repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[0], repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[1]
        )
    return repo


def write_siglip_decoder(config_path: Path, ckpt_path: Path) -> None:
    cfg = tiny_vit_decoder_config(hidden_size=1152, patch_size=14, num_patches=256)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_vit_decoder_state(cfg), ckpt_path)
    config = {"hidden_size": 768, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
              "decoder_num_attention_heads": 2, "decoder_intermediate_size": 48, "patch_size": 14,
              "hidden_act": "gelu", "layer_norm_eps": 1e-12, "model_type": "vit_mae"}  # fmt: skip
    config_path.write_text(json.dumps(config))


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch):
    """Each test imports its own fake clone; sys.path and the upstream modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in list(sys.modules):
        if name.split(".")[0] in ("stage1", "stage2", "scale_rae"):
            del sys.modules[name]


@pytest.fixture
def transformers_4(monkeypatch):
    monkeypatch.setattr(scale_rae_flow, "_transformers_version", lambda: scale_rae_flow.SCALE_RAE_TRANSFORMERS)


def dinov2_cfg(repo, weights, *extra):
    return load_config([
        "backbone=dinov2", f"backbone.repo_path={repo}", "backbone.class_ids=[207,0]", "save_xt_steps=[1,2]",
        "ldm_steps=3", "dtype=fp32", "device=cpu", f"checkpoint_dir={weights}", *extra,
    ])  # fmt: skip


def siglip_cfg(repo, *extra):
    return load_config([
        "backbone=siglip", f"backbone.repo_path={repo}", "prompt=a red fox in snow", "save_xt_steps=[1,3]",
        "dtype=fp32", "device=cpu", *extra,
    ])  # fmt: skip


def tiny_pid(backbone: str) -> PiDDecoder:
    record = lookup(backbone, "2k")
    return PiDDecoder(tiny_net(record.net_config), record, tiny_caption_encoder())


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def test_class_names_file_has_the_imagenet_order(tmp_path):
    names = rae_flows.load_class_names()
    assert len(names) == 1000
    assert (names[0], names[1], names[207], names[999]) == (
        "tench",
        "goldfish",
        "golden retriever",
        "toilet tissue",
    )
    short = tmp_path / "classes.txt"
    short.write_text("tench\ngoldfish\n\n")
    with pytest.raises(ConfigError, match="expected 1000 ImageNet class names in .*, got 2"):
        rae_flows.load_class_names(short)


def test_class_selection_rules():
    def prompts(*overrides):
        return rae_flows.class_prompts(load_config(["backbone=dinov2", *overrides]))

    assert prompts("backbone.class_ids=[207,0]") == ["207", "0"]
    assert prompts("backbone.class_ids=5") == ["5"]
    assert prompts("backbone.class_range=[998,1000]") == ["998", "999"]
    with pytest.raises(ConfigError, match="exactly one of"):
        prompts()
    with pytest.raises(ConfigError, match="exactly one of"):
        prompts("backbone.class_ids=[1]", "backbone.class_range=[0,2]")
    with pytest.raises(ConfigError, match=r"0 <= START < END <= 1000, got \[5, 5\)"):
        prompts("backbone.class_range=[5,5]")
    with pytest.raises(ConfigError, match=r"0 <= START < END <= 1000, got \[0, 1001\)"):
        prompts("backbone.class_range=[0,1001]")
    with pytest.raises(ConfigError, match=r"class id 1000 is outside \[0, 1000\)"):
        prompts("backbone.class_ids=[3,1000]")
    assert rae_flows.caption_for_item(load_config(["backbone=dinov2"]), "207") == "golden retriever"
    assert rae_flows.caption_for_item(load_config(["backbone=siglip"]), "a cat") == "a cat"


def test_missing_repositories_say_what_to_clone(tmp_path):
    with pytest.raises(ConfigError, match="git clone https://github.com/bytetriper/RAE"):
        plan_run(
            load_config(
                ["backbone=dinov2", f"backbone.repo_path={tmp_path / 'none'}", "backbone.class_ids=[1]"]
            )
        )
    with pytest.raises(ConfigError, match="git clone https://github.com/ZitengWangNYU/Scale-RAE"):
        plan_run(load_config(["backbone=siglip", f"backbone.repo_path={tmp_path / 'none'}", "prompt=x"]))


def test_rae_time_schedule_is_the_shifted_linear_grid():
    assert rae_flows.RAE_TIME_SHIFT == pytest.approx(13.8564, abs=1e-4)
    t = rae_flows.rae_time_schedule(51)
    assert (
        t.shape == (51,)
        and t[0].item() == pytest.approx(1.0)
        and t[-1].item() == pytest.approx(0.01368, abs=1e-4)
    )
    assert bool((t[1:] < t[:-1]).all())
    raw = 1 - torch.linspace(0, 0.999, 51)[10]
    assert t[10].item() == pytest.approx((13.8564 * raw / (1 + 12.8564 * raw)).item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# dinov2
# ----------------------------------------------------------------------------------------------------------


def test_dinov2_source_calls_upstream_as_specified(tmp_path):
    repo, weights = make_rae_repo(tmp_path), make_rae_weights(tmp_path / "ckpts")
    cfg = dinov2_cfg(repo, weights, "seed=7")
    plan = plan_run(cfg)
    source = rae_flows.make_source(cfg, plan, CPU)
    assert sys.path[0] == str((repo / "src").resolve())

    import stage1
    import stage2.transport
    from stage2.models import DDT

    (rae_call,) = stage1.CALLS
    assert rae_call["encoder_cls"] == "Dinov2withNorm" and rae_call["encoder_input_size"] == 448
    assert rae_call["encoder_params"] == {
        "dinov2_path": "facebook/dinov2-with-registers-base",
        "normalize": True,
    }
    assert rae_call["noise_tau"] == 0.0 and rae_call["reshape_to_2d"] is True
    assert rae_call["pretrained_decoder_path"] == str(
        weights / "rae/decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt"
    )
    assert rae_call["normalization_stat_path"] == str(
        weights / "rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt"
    )
    assert rae_call["decoder_config"] == {"decoder_hidden_size": 1152, "patch_size": 16}
    # the placeholder is patched in a temporary copy; the clone itself is untouched
    clone_config = json.loads((repo / "configs/decoder/ViTXL/config.json").read_text())
    assert clone_config["patch_size"] == "SHOULD BE RELOADED"

    main, guidance = DDT.INSTANCES
    common = dict(input_size=32, patch_size=1, in_channels=768, mlp_ratio=4.0, class_dropout_prob=0.1,
                  num_classes=1000, use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                  wo_shift=False, use_pos_embed=True)  # fmt: skip
    assert main.kwargs == {**common, "hidden_size": [1152, 2048], "depth": [28, 2], "num_heads": [16, 16]}
    assert guidance.kwargs == {**common, "hidden_size": [384, 2048], "depth": [12, 2], "num_heads": [6, 16]}
    assert main.gain.item() == 2.0 and guidance.gain.item() == 0.5  # "ema" sub-dict / bare state dict
    assert main.gain.dtype == guidance.gain.dtype == torch.float32
    (transport,) = stage2.transport.CREATED
    assert transport.kwargs == {"path_type": "Linear", "prediction": "velocity", "time_dist_type": "uniform",
                                "time_dist_shift": pytest.approx(13.8564, abs=1e-4)}  # fmt: skip
    assert source.sample_fn.sampler.ode_kwargs == {"sampling_method": "euler", "num_steps": 4, "atol": 1e-6,
                                                    "rtol": 1e-3, "reverse": False}  # fmt: skip

    captures = source.generate(1, "207")
    assert [c.label for c in captures] == ["01xt", "02xt", "x0"]
    times = rae_flows.rae_time_schedule(4)
    assert [c.sigma for c in captures] == pytest.approx([times[1].item(), times[2].item(), 0.0])
    assert all(c.latent.shape == (1, 768, 32, 32) and c.latent.dtype == torch.float32 for c in captures)
    first = main.calls[0]
    torch.testing.assert_close(first["y"], torch.tensor([207, 1000]))
    torch.testing.assert_close(first["x"][0], first["x"][1])  # [z, z]
    z = torch.randn(1, 768, 32, 32, generator=torch.Generator().manual_seed(7 + 1))
    torch.testing.assert_close(first["x"][:1], z)  # seed = base seed + index
    assert len(guidance.calls) == len(main.calls) == 3  # autoguidance evaluates both DiTs every step
    traj = source.trajectory(1, 207)
    assert traj.shape == (4, 768, 32, 32)
    torch.testing.assert_close(captures[1].latent, traj[2:3])
    torch.testing.assert_close(captures[-1].latent, traj[-1:])
    assert not torch.equal(source.trajectory(2, 207)[-1], traj[-1])
    assert source.caption_for(1, "207") == "golden retriever" and source.caption_for(0, "0") == "tench"

    import stage1 as upstream

    rae = source.space.module
    assert isinstance(rae, upstream.RAE)
    baseline = source.space.decode(captures[-1].latent)
    torch.testing.assert_close(baseline, rae.decode(captures[-1].latent).clamp(0, 1) * 2 - 1)
    assert baseline.shape == (1, 3, 512, 512)


def test_dinov2_baseline_is_the_upstream_decode_and_bf16_runs_under_autocast(tmp_path):
    repo, weights = make_rae_repo(tmp_path), make_rae_weights(tmp_path / "ckpts")
    cfg = dinov2_cfg(repo, weights, "dtype=bf16", "save_xt_steps=[]", "ldm_steps=1")
    source = rae_flows.make_source(cfg, plan_run(cfg), CPU)
    from stage2.models import DDT

    main, _ = DDT.INSTANCES
    captures = source.generate(0, "3")
    assert [c.label for c in captures] == ["x0"]
    assert main.gain.dtype == torch.float32 and main.calls[0]["autocast"] is True
    assert main.calls[0]["x"].dtype == torch.float32  # the noise is drawn in fp32

    # the RAE and its plain-tensor statistics follow the run dtype; decode = upstream rae.decode, [0,1] -> [-1,1]
    rae = source.space.module
    assert rae.decoder.weight.dtype == rae.latent_mean.dtype == rae.encoder_std.dtype == torch.bfloat16
    latent = captures[0].latent
    decoded = source.space.decode(latent)
    expected = rae.decode(latent.to(torch.bfloat16)).float().clamp(0, 1) * 2 - 1
    torch.testing.assert_close(decoded, expected)
    assert decoded.dtype == torch.float32 and decoded.shape == (1, 3, 512, 512)


def test_dinov2_with_an_injected_space_skips_the_upstream_rae(tmp_path):
    from pid.latents import get
    from pid.latents.rae import RAEAutoencoder, load_vit_decoder

    repo, weights = make_rae_repo(tmp_path), make_rae_weights(tmp_path / "ckpts")
    dcfg = tiny_vit_decoder_config(hidden_size=768)
    stats = torch.load(weights / "rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt")
    space = get("dinov2").attach(RAEAutoencoder(None, load_vit_decoder(tiny_vit_decoder_state(dcfg), dcfg, "tiny").eval(),
                                                stats["mean"], stats["var"]))  # fmt: skip
    cfg = dinov2_cfg(repo, weights, "save_xt_steps=[]", "ldm_steps=1")
    source = rae_flows.make_source(cfg, plan_run(cfg), CPU, space=space)
    import stage1

    assert source.space is space and stage1.CALLS == []
    image = source.space.decode(source.generate(0, "1")[0].latent)
    assert image.shape == (1, 3, 512, 512) and image.std() > 0


def test_dinov2_setting_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./checkpoints is searched too; keep it empty
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    repo, weights = make_rae_repo(tmp_path), make_rae_weights(tmp_path / "ckpts")
    with pytest.raises(ConfigError, match="T_MIN < T_MAX"):
        cfg = dinov2_cfg(repo, weights, "backbone.cfg_interval=[0.5,0.5]")
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    with pytest.raises(
        CheckpointNotFoundError, match="hf download nvidia/PiD checkpoints/rae/decoders/dinov2"
    ):
        cfg = dinov2_cfg(repo, tmp_path / "empty")
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        cfg = dinov2_cfg(repo, weights, f"backbone.decoder_ckpt={tmp_path / 'nope.pt'}")
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    (repo / rae_flows.DIT_FILES["dit_guid_ckpt"]).unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=r"cd .* && hf download nyu-visionx/RAE-collections --local-dir models"
    ):
        cfg = dinov2_cfg(repo, weights)
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    with pytest.raises(ConfigError, match=r"save_xt_steps \[4\] out of range \[1, 3\]"):
        plan_run(dinov2_cfg(repo, weights, "save_xt_steps=[4]"))
    with pytest.raises(ConfigError, match="resolution must be 2048"):
        plan_run(dinov2_cfg(repo, weights, "resolution=1024"))


def test_dinov2_end_to_end(tmp_path):
    repo, weights = make_rae_repo(tmp_path), make_rae_weights(tmp_path / "ckpts")
    out = tmp_path / "out"
    cfg = dinov2_cfg(repo, weights, "backbone.class_ids=[207]", "save_xt_steps=[2]", "scale=1", "pid_steps=2",
                     f"output_dir={out}")  # fmt: skip
    summary = run(cfg, decoder=tiny_pid("dinov2"))
    assert summary["failed"] == [] and summary["images"] == 2
    (run_dir,) = out.iterdir()
    meta = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert [m["step"] for m in meta] == ["02xt", "x0"]
    assert {m["prompt"] for m in meta} == {"golden retriever"}
    assert (
        meta[0]["sigma"] == pytest.approx(rae_flows.rae_time_schedule(4)[2].item()) and meta[1]["sigma"] == 0
    )
    import imageio.v3 as iio

    for label in ("02xt", "x0"):
        assert iio.imread(run_dir / "pid" / f"step_{label}" / "00000000.png").shape == (512, 512, 3)
        assert iio.imread(run_dir / "vae" / f"step_{label}" / "00000000.png").shape == (512, 512, 3)


# ----------------------------------------------------------------------------------------------------------
# siglip
# ----------------------------------------------------------------------------------------------------------


def test_siglip_refuses_other_transformers_majors(tmp_path, monkeypatch):
    repo = make_scale_rae_repo(tmp_path)
    monkeypatch.setattr(scale_rae_flow, "_transformers_version", lambda: "5.24.0")
    cfg = siglip_cfg(repo)
    with pytest.raises(ConfigError, match=r"needs transformers==4\.57\.1 \(installed: 5\.24\.0"):
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    assert "scale_rae" not in sys.modules  # refused before any upstream import


def test_siglip_source_calls_upstream_as_specified(tmp_path, transformers_4):
    repo = make_scale_rae_repo(tmp_path)
    cfg = siglip_cfg(repo, "seed=3", "backbone.guidance_level=1.0", "backbone.max_new_tokens=77")
    source = rae_flows.make_source(cfg, plan_run(cfg), CPU)
    assert sys.path[0] == str(repo.resolve())
    from scale_rae import mm_utils, utils
    from scale_rae.model import builder

    assert utils.STATE["disabled"] is True
    (load,) = builder.CALLS
    assert load == {"model_path": "nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B", "model_base": None,
                    "model_name": "Scale-RAE-Qwen1.5B_DiT2.4B", "device_map": {"": "cpu"}, "device": "cpu",
                    "torch_dtype": torch.float32}  # fmt: skip
    model = source.model
    assert not model.training and not model.model.training and not model.diff_head.training
    assert model._attn_implementation == model.model.config._attn_implementation

    captures = source.generate(2, "a red fox in snow")
    (call,) = model.generate_calls
    assert call["images"] is None and call["input_ids"].shape[0] == 1
    assert {k: call[k] for k in call if k not in ("input_ids", "images")} == {
        "output_image": True, "do_sample": True, "temperature": 0.0, "use_customize_greedy": True, "top_p": None,
        "num_beams": 1, "max_new_tokens": 77, "use_cache": True, "start_image_token_id": 61,
        "end_image_token_id": 62, "eos_token_id": 63, "guidance_level": 1.0,
    }  # fmt: skip
    prompt, image_token = mm_utils.PROMPTS[-1]
    assert image_token == -200
    assert (
        prompt
        == "<|im_start|>user\nCould you generate an image of a red fox in snow<|im_end|>\n<|im_start|>assistant\n"
    )
    assert source.caption_for(2, "a red fox in snow") == "a red fox in snow"  # PiD gets the original caption

    assert [c.label for c in captures] == ["01xt", "03xt", "x0"]
    times = (
        model.diff_head.inference_flow.sampler_timesteps
    )  # steps walk used_timesteps 3->2->1->0, then 3->4
    assert [c.sigma for c in captures] == pytest.approx([times[2], times[0], 0.0])
    assert all(c.latent.shape == (1, 1152, 16, 16) for c in captures)
    # x_t is de-normalised like the head's final sample (x * data_std + data_mean) and laid out as a raster grid
    raw, _ = source.capture.captured[3]
    torch.testing.assert_close(captures[1].latent, raw * 2.0 + 0.5)
    # a second call with the same seed gives the same sample
    again = source.generate(2, "a red fox in snow")
    torch.testing.assert_close(again[-1].latent, captures[-1].latent)
    assert not torch.equal(source.generate(3, "a red fox in snow")[-1].latent, captures[-1].latent)


def test_siglip_counting_loop_matches_the_upstream_loop(tmp_path, transformers_4):
    repo = make_scale_rae_repo(tmp_path)
    cfg = siglip_cfg(repo, "save_xt_steps=[4]")
    source = rae_flows.make_source(cfg, plan_run(cfg), CPU)
    from scale_rae.model.diffusion_loss import diffloss

    flow = source.model.diff_head.inference_flow
    assert flow.p_sample_loop == source.capture.p_sample_loop
    x_end, y = torch.randn(1, 1152, 16, 16), torch.randn(1, 16)
    kwargs = dict(clip_denoised=False, model_kwargs={"y": y}, device=CPU)
    ours = flow.p_sample_loop(source.model.diff_head.model.forward, x_end.shape, x_end, **kwargs)
    upstream = diffloss.RectifiedFlow.p_sample_loop(
        flow, source.model.diff_head.model.forward, x_end.shape, x_end, **kwargs
    )
    torch.testing.assert_close(ours, upstream)
    assert source.capture.count == 4
    torch.testing.assert_close(source.capture.captured[4][0], upstream)


def test_siglip_errors(tmp_path, transformers_4):
    repo = make_scale_rae_repo(tmp_path)
    from_head_steps = siglip_cfg(repo, "save_xt_steps=[5]")
    with pytest.raises(ConfigError, match=r"save_xt_steps \[5\] out of range \[1, 4\]"):
        rae_flows.make_source(from_head_steps, plan_run(from_head_steps), CPU)

    from scale_rae.model import builder
    from scale_rae.model.diffusion_loss import diffloss

    builder.OPTIONS["head"] = type(
        "OtherProjector", (torch.nn.Module,), {"inference_flow": diffloss.RectifiedFlow(4)}
    )
    cfg = siglip_cfg(repo)
    with pytest.raises(ConfigError, match="only a FullSequenceRectifiedFlowProjector .* got OtherProjector"):
        rae_flows.make_source(cfg, plan_run(cfg), CPU)
    builder.OPTIONS["head"] = diffloss.FullSequenceRectifiedFlowProjector

    source = rae_flows.make_source(cfg, plan_run(cfg), CPU)
    flow = source.model.diff_head.inference_flow
    flow.p_sample_loop = type(flow).p_sample_loop.__get__(flow)  # something replaced our loop again
    with pytest.raises(RuntimeError, match="x_t capture for step 1 did not fire"):
        source.generate(0, "a cat")
    builder.OPTIONS["empty"] = True
    with pytest.raises(RuntimeError, match="Scale-RAE returned no image embeddings for prompt: 'a cat'"):
        source.generate(0, "a cat")
    builder.OPTIONS["empty"] = False
    with pytest.raises(ConfigError, match="max_new_tokens must be positive"):
        bad = siglip_cfg(repo, "backbone.max_new_tokens=0")
        rae_flows.make_source(bad, plan_run(bad), CPU)
    with pytest.raises(ConfigError, match="siglip generates at 256x256 only"):
        plan_run(siglip_cfg(repo, "resolution=2048", "scale=4"))


def test_siglip_decoder_resolution_order(tmp_path, monkeypatch):
    import huggingface_hub

    repo = make_scale_rae_repo(tmp_path, with_decoder=False)
    explicit = (tmp_path / "dec/cfg.json", tmp_path / "dec/model.pt")
    write_siglip_decoder(*explicit)
    cfg = siglip_cfg(repo, f"backbone.decoder_config={explicit[0]}", f"backbone.decoder_ckpt={explicit[1]}")
    assert scale_rae_flow.resolve_scale_rae_decoder(cfg, repo) == explicit
    with pytest.raises(ConfigError, match="give both backbone.decoder_config and backbone.decoder_ckpt"):
        scale_rae_flow.resolve_scale_rae_decoder(siglip_cfg(repo, f"backbone.decoder_ckpt={explicit[1]}"), repo)
    with pytest.raises(CheckpointNotFoundError, match="backbone.decoder_config .* does not exist"):
        missing = siglip_cfg(
            repo, f"backbone.decoder_config={tmp_path / 'x.json'}", f"backbone.decoder_ckpt={explicit[1]}"
        )
        scale_rae_flow.resolve_scale_rae_decoder(missing, repo)

    monkeypatch.chdir(tmp_path)  # ./checkpoints is searched too; keep it empty
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        CheckpointNotFoundError, match="hf download nyu-visionx/siglip2_decoder config.json model.pt"
    ):
        scale_rae_flow.resolve_scale_rae_decoder(siglip_cfg(repo), repo)
    pid_dir = tmp_path / "ckpts"
    pid_files = (pid_dir / "scale_rae/decoder/XL_decoder_config.json",
                 pid_dir / "scale_rae/decoder/siglip2_sop14_i224_web73M_ganw3_decXL.pt")  # fmt: skip
    write_siglip_decoder(*pid_files)
    assert (
        scale_rae_flow.resolve_scale_rae_decoder(siglip_cfg(repo, f"checkpoint_dir={pid_dir}"), repo) == pid_files
    )
    write_siglip_decoder(
        repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[0], repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[1]
    )
    in_repo = scale_rae_flow.resolve_scale_rae_decoder(siglip_cfg(repo, f"checkpoint_dir={pid_dir}"), repo)
    assert in_repo == (repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[0], repo / scale_rae_flow.SCALE_RAE_REPO_DECODER[1])


def test_qwen2_forward_patch_drops_only_a_stale_mask():
    from transformers import Qwen2Config, Qwen2Model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model as Stock

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    inner = Qwen2Model(config).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    reference = inner(input_ids=ids).last_hidden_state
    holder = torch.nn.Module()
    holder.model = inner
    scale_rae_flow.patch_scale_rae_model(holder)
    assert isinstance(inner.forward, type(holder.forward)) and inner.forward.__func__ is not Stock.forward
    stale = inner(input_ids=ids, attention_mask=torch.ones(1, 1, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(stale, reference)
    positional = inner(ids, torch.ones(1, 1, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(positional, reference)
    padded = torch.tensor([[0, 1, 1, 1, 1]])  # a mask of the right length is kept
    kept = inner(input_ids=ids, attention_mask=padded).last_hidden_state
    torch.testing.assert_close(
        kept, Stock.forward(inner, input_ids=ids, attention_mask=padded).last_hidden_state
    )
    assert not torch.allclose(kept[:, 1:], reference[:, 1:])


def test_siglip_end_to_end(tmp_path, transformers_4):
    repo = make_scale_rae_repo(tmp_path)
    out = tmp_path / "out"
    cfg = siglip_cfg(repo, "save_xt_steps=[2]", "scale=1", "pid_steps=2", f"output_dir={out}")
    summary = run(cfg, decoder=tiny_pid("siglip"))
    assert summary["failed"] == [] and summary["images"] == 2
    (run_dir,) = out.iterdir()
    meta = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert [m["step"] for m in meta] == ["02xt", "x0"]
    assert {m["prompt"] for m in meta} == {"a red fox in snow"}
    assert meta[0]["sigma"] == pytest.approx(2 / 5) and meta[1]["sigma"] == 0  # t_next of step 2: timestep 1
    import imageio.v3 as iio

    for label in ("02xt", "x0"):
        assert iio.imread(run_dir / "pid" / f"step_{label}" / "00000000.png").shape == (256, 256, 3)
        assert iio.imread(run_dir / "vae" / f"step_{label}" / "00000000.png").shape == (256, 256, 3)
