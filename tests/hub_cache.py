"""A Hugging Face hub cache holding tiny random-weight stand-ins under the REAL repo ids.

The layout is huggingface_hub's own (what `hf_hub_download` writes):

    <cache>/models--<org>--<name>/blobs/<sha256>             file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<path>  relative symlinks into blobs/
    <cache>/models--<org>--<name>/refs/<branch>              the commit hash a branch points at

so with `HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1` every loader resolves from it exactly as it would
from a real cache: `hf_hub_download`, `snapshot_download`, `try_to_load_from_cache`, diffusers and
transformers `from_pretrained` (checked in tests/test_hub_e2e.py). Nothing is downloaded.

Contents:
- nvidia/PiD: tiny PiD decoders that carry their network config (`pid.net_config`) at the real
  paths of flux/2k, flux/2kto4k (in checkpoints_deprecated/), flux2/2k; the FLUX.1 VAE
  `checkpoints/ae.safetensors` at its real size (83.8M random bf16 weights: `FluxLatentSpace.load`
  builds the real FLUX.1 VAE config, so a smaller file cannot load); a `v1` branch whose flux/2k
  decoder has other weights (revision tests).
- Efficient-Large-Model/gemma-2-2b-it: a tiny Gemma-2 and its tokenizer (tests/tiny.py).
- Tongyi-MAI/Z-Image-Turbo and black-forest-labs/FLUX.1-dev: tiny diffusers pipelines
  (tests/tiny_pipelines.py, save_pretrained).

In a test module:

    from hub_cache import hub_cache_env   # noqa: F401  (the session fixture; or add it to conftest.py)

    def test_x(hub_cache_env):             # env dict for subprocesses
        subprocess.run([...], env=hub_cache_env)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

PID_REPO = "nvidia/PiD"
GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"
PIPELINE_REPOS = {"zimage-turbo": "Tongyi-MAI/Z-Image-Turbo", "flux": "black-forest-labs/FLUX.1-dev"}
# (backbone, ckpt_type) of the tiny PiD decoders placed at their real hub paths
PID_DECODERS = (("flux", "2k"), ("flux", "2kto4k"), ("flux2", "2k"))


class CacheRepo:
    """Writes one repo of a hub cache in huggingface_hub's layout (blobs + snapshot symlinks + refs)."""

    def __init__(self, cache: Path, repo_id: str, repo_type: str = "model") -> None:
        self.root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        self.files: dict[str, str] = {}  # path in repo -> blob hash

    def add_bytes(self, path_in_repo: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        blob = self.root / "blobs" / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
        self.files[path_in_repo] = digest

    def add_file(self, path_in_repo: str, source: Path) -> None:
        digest = _sha256_file(source)
        blob = self.root / "blobs" / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
        self.files[path_in_repo] = digest

    def add_folder(self, folder: Path, prefix: str = "") -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.add_file(f"{prefix}{path.relative_to(folder).as_posix()}", path)

    def commit(self, ref: str = "main") -> str:
        """Write a snapshot of the files added so far and point `ref` at it; returns the commit hash."""
        listing = "\n".join(f"{p} {h}" for p, h in sorted(self.files.items()))
        commit = hashlib.sha1(f"{ref}\n{listing}".encode()).hexdigest()
        snapshot = self.root / "snapshots" / commit
        for path_in_repo, digest in self.files.items():
            link = snapshot / path_in_repo
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(self.root / "blobs" / digest, link.parent)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        (self.root / "refs").mkdir(parents=True, exist_ok=True)
        (self.root / "refs" / ref).write_text(commit)
        return commit


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Contents
# ----------------------------------------------------------------------------------------------


def tiny_pid_checkpoint(net_config: str, seed: int = 0) -> bytes:
    """A `.pth` of a tiny network of `net_config`'s kind, in the released names (`net.` prefix, bf16),
    carrying its own config the way `python -m pid.convert out.pth` writes it."""
    import io

    from pid.checkpoints import NET_CONFIG_KEY
    from pid.models.configs import net_config_to_dict

    from tiny import tiny_net

    net = tiny_net(net_config, seed=seed)
    state = {f"net.{k}": v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, NET_CONFIG_KEY: net_config_to_dict(net.cfg)}, buffer)
    return buffer.getvalue()


def random_flux1_vae_file(path: Path, seed: int = 0) -> None:
    """The FLUX.1 VAE at its real size with small random bf16 weights, in the original
    black-forest-labs layout of `ae.safetensors`. Built from shapes alone (no module init)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from pid.latents.flux import FLUX1_VAE_CONFIG

    from tiny_vaes import diffusers_to_bfl

    with torch.device("meta"):
        skeleton = AutoencoderKL.from_config(FLUX1_VAE_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in skeleton.state_dict().items():
        if name.endswith("weight") and "norm" in name:
            value = torch.ones(meta.shape, dtype=torch.bfloat16)
        elif name.endswith("bias"):
            value = torch.zeros(meta.shape, dtype=torch.bfloat16)
        else:  # uniform with unit-ish gain, drawn straight in bf16 (84M values: keep it cheap)
            bound = (3.0 / (meta[0].numel() if meta.ndim > 1 else 1)) ** 0.5
            value = torch.empty(meta.shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=gen)
        state[name] = value
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(state).items()}, str(path))


def build_hub_cache(cache: Path) -> Path:
    """Fill `cache` (an HF_HUB_CACHE folder) with every stand-in; returns it."""
    from pid.checkpoints import lookup

    from tiny import tiny_gemma, tiny_tokenizer
    from tiny_pipelines import make_tiny_pipeline

    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hub_cache_build_"))
    try:
        pid_repo = CacheRepo(cache, PID_REPO)
        for seed, (backbone, ckpt_type) in enumerate(PID_DECODERS):
            record = lookup(backbone, ckpt_type)
            pid_repo.add_bytes(record.hub_path, tiny_pid_checkpoint(record.net_config, seed=seed))
        random_flux1_vae_file(work / "ae.safetensors")
        pid_repo.add_file("checkpoints/ae.safetensors", work / "ae.safetensors")
        pid_repo.commit("main")
        # branch "v1": the flux/2k decoder with other weights (revision= must pick it)
        pid_repo.add_bytes(lookup("flux", "2k").hub_path, tiny_pid_checkpoint("v1_latent16ch", seed=99))
        pid_repo.commit("v1")

        gemma = CacheRepo(cache, GEMMA_REPO)
        tiny_gemma().save_pretrained(work / "gemma")
        tiny_tokenizer().save_pretrained(work / "gemma")
        gemma.add_folder(work / "gemma")
        gemma.commit()

        for backbone, repo_id in PIPELINE_REPOS.items():
            make_tiny_pipeline(backbone).save_pretrained(work / backbone)
            repo = CacheRepo(cache, repo_id)
            repo.add_folder(work / backbone)
            repo.commit()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache


def hub_env(cache: Path, home: Path) -> dict[str, str]:
    """Environment for subprocesses that must resolve everything from `cache`, offline and tokenless."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(home),  # no token file, no stray config from the machine's own HF home
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PID_CHECKPOINT_DIR="",
    )
    env.pop("PID_CHECKPOINT_DIR")
    return env


_SESSION_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def hub_cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Env dict (HF_HUB_CACHE=<tiny hub cache>, HF_HUB_OFFLINE=1, ...) for subprocesses.

    Built once per test session (~5 s plus imports), however many modules use the fixture.
    """
    if not _SESSION_ENV:
        root = tmp_path_factory.mktemp("hub")
        cache = build_hub_cache(root / "cache")
        (root / "home").mkdir()
        _SESSION_ENV.update(hub_env(cache, root / "home"))
    return dict(_SESSION_ENV)
