"""Hub failures become one line each (huggingface_hub's own exception classes, raised by a patched download)."""

import pytest
from huggingface_hub import errors as hub_errors

import pid.hub
from pid.checkpoints import lookup, resolve_checkpoint, resolve_hub_path
from pid.errors import CheckpointNotFoundError
from pid.hub import (
    HubFileMissingError,
    HubGatedError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    translate_hub_error,
)

from hub_fakes import connect_error, entry_not_found, http_response


def _response(status: int, url: str = "https://huggingface.co/nvidia/PiD"):
    return http_response(status, url)


def _raiser(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc

    return fake


HUB_FAILURES = {
    "gated": (hub_errors.GatedRepoError("403 gated", response=_response(403)), HubGatedError),
    "missing": (entry_not_found(), HubFileMissingError),
    "repo": (hub_errors.RepositoryNotFoundError("404 repo", response=_response(404)), HubRepoNotFoundError),
    "revision": (hub_errors.RevisionNotFoundError("404 rev", response=_response(404)), HubRevisionNotFoundError),
    "offline": (hub_errors.LocalEntryNotFoundError("not cached"), HubOfflineError),
    "network": (connect_error(), HubOfflineError),
    "offline-mode": (hub_errors.OfflineModeIsEnabled("offline"), HubOfflineError),
}


@pytest.fixture()
def no_local_copies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PID_CHECKPOINT_DIR", raising=False)
    return tmp_path


@pytest.mark.parametrize("kind", sorted(HUB_FAILURES))
def test_pid_file_failures_are_one_distinct_line(kind, no_local_copies, monkeypatch):
    exc, expected = HUB_FAILURES[kind]
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _raiser(exc))
    record = lookup("flux", "2k")
    with pytest.raises(expected) as info:
        resolve_checkpoint(record, revision="v2" if kind == "revision" else None)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, CheckpointNotFoundError)
    if kind == "gated":
        assert "nvidia/PiD" in msg and "https://huggingface.co/nvidia/PiD" in msg and "hf auth login" in msg
    elif kind == "missing":
        assert record.hub_path in msg and "nvidia/PiD" in msg
    elif kind == "repo":
        assert "nvidia/PiD does not exist" in msg and "private" in msg
    elif kind == "revision":
        assert "'v2'" in msg
    else:
        assert f"hf download nvidia/PiD {record.hub_path} --local-dir ." in msg


def test_translator_walks_wrapped_errors_and_leaves_others():
    gated = hub_errors.GatedRepoError("403", response=_response(403))
    try:
        try:
            raise gated
        except hub_errors.GatedRepoError as inner:
            raise OSError("You are trying to access a gated repo.\nMake sure ...") from inner
    except OSError as wrapped:
        out = translate_hub_error(wrapped, "black-forest-labs/FLUX.1-dev")
    assert isinstance(out, HubGatedError) and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in str(out)
    assert translate_hub_error(OSError("disk full"), "x/y") is None
    assert translate_hub_error(ValueError("nope"), "x/y") is None
    with pytest.raises(ValueError):  # never swallows what is not a hub failure
        with pid.hub.hub_errors("x/y"):
            raise ValueError("nope")


def test_folder_download_and_revision_reach_snapshot_download(no_local_copies, monkeypatch, tmp_path):
    seen = {}

    def fake_snapshot(repo, allow_patterns=None, revision=None, **kwargs):
        seen.update(repo=repo, allow=allow_patterns, revision=revision)
        root = tmp_path / "snap"
        (root / "checkpoints" / "sd3_vae").mkdir(parents=True, exist_ok=True)
        (root / "checkpoints" / "sd3_vae" / "config.json").write_text("{}")
        return str(root)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    path = resolve_hub_path("sd3_vae", is_dir=True, revision="abc123")
    assert path == tmp_path / "snap" / "checkpoints" / "sd3_vae"
    assert seen == {"repo": "nvidia/PiD", "allow": ["checkpoints/sd3_vae/*"], "revision": "abc123"}
    monkeypatch.setattr("huggingface_hub.snapshot_download", _raiser(hub_errors.LocalEntryNotFoundError("x")))
    with pytest.raises(HubOfflineError, match='hf download nvidia/PiD --include "checkpoints/sd3_vae/\\*"'):
        resolve_hub_path("sd3_vae", is_dir=True)


def test_latent_space_loads_pass_the_revision(no_local_copies, monkeypatch):
    import pid.latents

    seen = []

    def fake_download(repo, filename, revision=None, **kwargs):
        seen.append((repo, filename, revision))
        raise entry_not_found("404")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    with pytest.raises(HubFileMissingError, match="checkpoints/ae.safetensors"):
        pid.latents.get("flux").load(device="cpu", revision="r1")
    assert seen[0] == ("nvidia/PiD", "checkpoints/ae.safetensors", "r1")


@pytest.mark.parametrize("kind", ["gated", "repo", "offline"])
def test_pipeline_failures_name_the_ldm_repo(kind, monkeypatch):
    import diffusers

    from pid.inference.pipelines import get_pipeline_spec, load_pipeline

    exc, expected = HUB_FAILURES[kind]

    def wrapped(source, **kwargs):
        raise OSError(f"{source} failed\nsecond line") from exc  # how diffusers reports hub failures

    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", wrapped)
    with pytest.raises(expected) as info:
        load_pipeline(get_pipeline_spec("flux"), device="cpu", revision="main")
    msg = str(info.value)
    assert "\n" not in msg and "black-forest-labs/FLUX.1-dev" in msg
    if kind == "gated":
        assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in msg and "hf auth login" in msg
    if kind == "offline":
        assert "hf download black-forest-labs/FLUX.1-dev --revision main" in msg


def test_pipeline_gets_the_revision_and_the_huggingface_hub_token(monkeypatch):
    import diffusers

    from pid.inference.pipelines import get_pipeline_spec, load_pipeline

    seen = {}

    class FakePipe:
        def to(self, device):
            return self

    def fake(source, **kwargs):
        seen.update(kwargs, source=source)
        return FakePipe()

    monkeypatch.setattr(diffusers.ZImagePipeline, "from_pretrained", fake)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "from-login")
    load_pipeline(get_pipeline_spec("zimage-turbo"), device="cpu", revision="refs/pr/3")
    assert seen["revision"] == "refs/pr/3" and seen["token"] == "from-login"


@pytest.mark.parametrize("kind", ["gated", "missing", "offline"])
def test_caption_encoder_failures(kind, monkeypatch):
    import transformers

    from pid.text_encoder import DEFAULT_TEXT_ENCODER, CaptionEncoder

    exc, expected = HUB_FAILURES[kind]
    seen = {}

    def wrapped(name, **kwargs):
        seen.update(kwargs)
        raise OSError("transformers says no\nmore") from exc

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrapped)
    with pytest.raises(expected) as info:
        CaptionEncoder.from_pretrained(device="cpu", revision="v7")
    msg = str(info.value)
    assert "\n" not in msg and DEFAULT_TEXT_ENCODER in msg and seen["revision"] == "v7"
    if kind == "offline":
        assert f"hf download {DEFAULT_TEXT_ENCODER} --revision v7" in msg


def test_no_hand_rolled_token_reading():
    import inspect

    import pid.inference.pipelines
    import pid.text_encoder

    for module in (pid.inference.pipelines, pid.text_encoder, pid.checkpoints, pid.hub):
        source = inspect.getsource(module)
        assert "HUGGING_FACE_HUB_TOKEN" not in source and 'environ.get("HF_TOKEN"' not in source
