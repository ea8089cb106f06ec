import json
from dataclasses import dataclass, field

import pytest

from unclip.config import Config, ConfigError, DiffusionConfig, TrainConfig


@dataclass
class Inner(Config):
    width: int = 4
    mode: str = "a"


@dataclass
class Outer(Config):
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    names: list[str] = field(default_factory=lambda: ["x"])
    scale: float | None = None


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(),
        TrainConfig(steps=7, lr=3e-4, betas=(0.8, 0.95), bf16=False),
        DiffusionConfig(schedule="linear", prediction="v", learn_sigma=True, loss="hybrid"),
        Outer(inner=Inner(width=9, mode="b"), sizes=(3, 4, 5), names=["p", "q"], scale=0.5),
    ],
)
def test_json_round_trip(cfg, tmp_path):
    assert type(cfg).from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert type(cfg).load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text()) == cfg.to_dict()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'lrate'"):
        TrainConfig.from_dict({"lrate": 0.1})


def test_unknown_nested_key_names_its_path():
    with pytest.raises(ConfigError, match=r"Outer\.inner: unknown key 'depth'"):
        Outer.from_dict({"inner": {"depth": 3}})


@pytest.mark.parametrize(
    "data, field_name",
    [
        ({"lr": "fast"}, "lr"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"bf16": "yes"}, "bf16"),
        ({"betas": [0.9]}, "betas"),
    ],
)
def test_wrong_type_names_the_field(data, field_name):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field_name}"):
        TrainConfig.from_dict(data)


def test_literal_and_post_init_checks():
    with pytest.raises(ConfigError, match="schedule"):
        DiffusionConfig.from_dict({"schedule": "sigmoid"})
    with pytest.raises(ConfigError, match="learn_sigma"):
        DiffusionConfig.from_dict({"loss": "hybrid"})
    with pytest.raises(ConfigError, match="divisible by grad_accum"):
        TrainConfig.from_dict({"batch_size": 10, "grad_accum": 3})


def test_bad_file_names_the_path(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="run.json"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="missing.json"):
        TrainConfig.load(tmp_path / "missing.json")
    bad.write_text('{"nope": 1}')
    with pytest.raises(ConfigError, match=r"run\.json: unknown key 'nope'"):
        TrainConfig.load(bad)


def test_every_shipped_run_config_loads():
    """Each file in configs/ loads into the config class its stage reads (no stale or unknown
    keys), so `make train-default` and the documented runs start."""
    from pathlib import Path

    from unclip import run_configs as rc
    from unclip.pipeline.config import SamplingConfig

    classes = {"clip": rc.ClipRunConfig, "decoder": rc.DecoderRunConfig,
               "upsampler": rc.UpsamplerRunConfig, "sampling": SamplingConfig}  # fmt: skip
    files = sorted((Path(__file__).parents[1] / "configs").glob("*/*.json"))
    assert len(files) >= 9
    for path in files:
        stage = path.stem.split("-")[0]
        if stage == "prior":
            ar = json.loads(path.read_text()).get("type") == "ar"
            cls = rc.ARPriorRunConfig if ar else rc.PriorRunConfig
        else:
            cls = classes[stage]
        try:
            cls.load(path)
        except ConfigError as e:
            pytest.fail(f"{path}: {e}")


def test_a_prior_run_refuses_raw_embeddings(tmp_path):
    """A prior run trains on unit CLIP embeddings; 'raw' is the standardised space of
    converted Karlo priors, which its loss does not produce."""
    from pathlib import Path

    from unclip.run_configs import PriorRunConfig

    data = json.loads((Path(__file__).parents[1] / "configs/emoji-small/prior.json").read_text())
    data["model"]["embeddings"] = "raw"
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"prior\.json: model\.embeddings: .*got 'raw'"):
        PriorRunConfig.load(path)
