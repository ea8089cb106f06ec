import subprocess
import sys

import pytest

import unclip
from unclip.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert unclip.__version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: unclip" in capsys.readouterr().out


def test_import_is_light():
    code = (
        "import sys, unclip; heavy = [m for m in ('fastapi', 'uvicorn', 'pyarrow', 'webdataset', "
        "'resvg_py', 'diffusers', 'transformers', 'unclip.train', 'unclip.server', 'unclip.eval') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_demo_generates_an_image_with_the_shipped_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "unclip.demo", "a red apple, noto style"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    from PIL import Image

    image = Image.open(tmp_path / "demo" / "generate-0-0.png")
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a red apple, noto style"
