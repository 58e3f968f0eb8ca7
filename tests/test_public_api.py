"""Everything `pid` advertises imports, and `import pid` stays cheap."""

import subprocess
import sys

import pid


def test_every_public_name_resolves():
    for name in pid.__all__:
        assert getattr(pid, name) is not None, name


def test_import_pid_does_not_import_torch_or_diffusers():
    code = "import sys, pid; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
