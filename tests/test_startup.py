"""Start-up: ``import unclip``, building the ``unclip`` parser, ``--help`` and argument errors
import no torch (issue #34); each check runs in a fresh interpreter."""

import pytest

from python_child import run_python
from unclip.cli import TRAIN_STAGES, main

# Runs ``main(argv)`` (or only builds the parser and formats every command's help, for
# argv None) and prints, last, whether torch was imported and the exit code.
PROBE = """
import sys
import unclip.cli

argv = {argv!r}
code = 0
if argv is None:
    parser = unclip.cli.build_parser()
    (commands,) = [a for a in parser._actions if hasattr(a, "choices") and a.choices]
    for command in commands.choices.values():
        command.format_help()
else:
    try:
        code = unclip.cli.main(argv)
    except SystemExit as e:
        code = e.code
print("torch" in sys.modules, code)
"""


def _probe(argv: list[str] | None) -> tuple[bool, int]:
    loaded, code = run_python(PROBE.format(argv=argv)).splitlines()[-1].split()
    return loaded == "True", int(code)


def test_import_unclip_loads_no_torch_and_keeps_its_names():
    code = (
        "import sys, unclip; assert 'torch' not in sys.modules, 'import unclip loaded torch'; "
        "from unclip import from_pretrained, save_pretrained, load_pipeline; "
        "import unclip.hub; assert from_pretrained is unclip.hub.from_pretrained; "
        "assert save_pretrained is unclip.hub.save_pretrained"
    )
    run_python(code)


@pytest.mark.parametrize("package", ["unclip", "unclip.pipeline", "unclip.train"])
def test_lazy_packages_list_their_names_and_refuse_others(package):
    import importlib

    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert name in dir(mod)
        assert getattr(mod, name) is not None
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        mod.nope  # noqa: B018


def test_building_the_parser_and_every_commands_help_loads_no_torch():
    assert _probe(None) == (False, 0)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["train", "--help"],
        ["train"],
        *[["train", stage, "--help"] for stage in sorted(TRAIN_STAGES)],
        ["train", "clip"],  # missing --run-dir
        ["train", "prior", "--run-dir", "r", "--type", "gan"],  # not a prior type
        ["data", "check", "--help"],
        ["eval", "pipeline", "--help"],
        ["embed", "--help"],
        ["classify", "--help"],
        ["info", "--help"],
        ["serve", "--help"],
        ["bench", "--help"],
        ["generate", "--help"],
        ["info"],  # missing PATH
        ["serve", "--port", "eighty"],  # not a number
        ["classify", "x.png"],  # missing --labels
        ["generate"],  # no caption: reported by the command itself
        ["generate", "a cat", "--decoder-steps", "0"],  # out of range, before any model loads
        ["vary", "no-such-image.png"],
        ["nosuch"],
    ],
    ids=" ".join,
)
def test_help_and_argument_errors_load_no_torch(argv):
    loaded, code = _probe(argv)
    assert not loaded, f"unclip {' '.join(argv)} imported torch"
    assert code == (0 if "--help" in argv else 2)


def test_a_train_stage_gets_its_flags_when_used(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "upsampler", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--run-dir" in text and "--fsdp" in text  # the common training flags
    with pytest.raises(SystemExit) as e:
        main(["train", "tokenizer", "--help"])
    assert e.value.code == 0
    assert "--run-dir" not in capsys.readouterr().out  # COMMON_TRAIN_ARGS = False
    with pytest.raises(SystemExit) as e:
        main(["train", "clip"])  # --run-dir is required
    assert e.value.code == 2
    assert "--run-dir" in capsys.readouterr().err


def test_the_light_name_lists_match_the_registries_they_stand_for():
    """The sampler and precision names the parser and the server's schema list without
    importing torch are the names the pipeline accepts."""
    from unclip.commands import DTYPE_CHOICES, SAMPLER_NAMES
    from unclip.diffusion import SAMPLERS
    from unclip.pipeline.stages import DTYPES

    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)
    assert list(DTYPE_CHOICES) == ["auto", *DTYPES]
