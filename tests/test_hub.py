import json
import os
import pickle

import pytest
import torch

from toy import ToyConfig, ToyModel
from unclip.hub import (
    EMA_NAME,
    WEIGHTS_NAME,
    HubError,
    UnsafeWeightsError,
    from_pretrained,
    load_config,
    load_state_dict,
    meta_model,
    save_pretrained,
)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyModel(ToyConfig(**kw)).eval()


def test_round_trip_gives_identical_outputs(tmp_path):
    model = make_model(dim=6, hidden=12)
    save_pretrained(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["type"] == "toy" and doc["format_version"] == 1
    assert doc["config"] == {"dim": 6, "hidden": 12, "dropout": 0.1}
    loaded = from_pretrained(tmp_path / "m")
    assert isinstance(loaded, ToyModel) and loaded.config == model.config
    assert not loaded.training
    x = torch.randn(5, 6)
    assert torch.equal(model(x), loaded(x))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    # safetensors keeps header metadata in a hash map: unsorted, its order changed per save
    from safetensors import safe_open

    from unclip.hub import save_state_dict

    state = make_model(dim=6, hidden=12).state_dict()
    meta = {f"key{i}": f"value {i}" for i in range(12)}
    files = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for f in files:
        save_state_dict(state, f, metadata=meta)
    assert len({f.read_bytes() for f in files}) == 1
    n = int.from_bytes(files[0].read_bytes()[:8], "little")
    header = json.loads(files[0].read_bytes()[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(meta)
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata() == meta
        for k, v in state.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_ema_weights_are_preferred_and_selectable(tmp_path):
    model, ema = make_model(0), make_model(1)
    save_pretrained(model, tmp_path / "m", ema=ema)
    x = torch.randn(3, 8)
    assert torch.equal(from_pretrained(tmp_path / "m")(x), ema(x))
    assert torch.equal(from_pretrained(tmp_path / "m", weights="model")(x), model(x))
    save_pretrained(model, tmp_path / "m")  # re-saved without EMA: the stale file goes
    assert not (tmp_path / "m" / EMA_NAME).exists()
    with pytest.raises(HubError, match="no ema.safetensors"):
        from_pretrained(tmp_path / "m", weights="ema")


def test_fp16_on_disk_loads_into_fp32_model(tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path / "m", dtype=torch.float16)
    state = load_state_dict(tmp_path / "m" / WEIGHTS_NAME)
    assert state["net.0.weight"].dtype == torch.float16
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.net[0].weight.dtype == torch.float32
    assert torch.allclose(loaded.net[0].weight, model.net[0].weight, atol=1e-3)


def test_mismatched_weights_are_refused_with_names(tmp_path):
    save_pretrained(make_model(hidden=16), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["config"]["hidden"] = 20
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        HubError, match=r"model.safetensors: tensor 'net.0.weight' has shape \(16, 8\)"
    ):
        from_pretrained(tmp_path / "m")


def test_bad_config_documents(tmp_path):
    folder = tmp_path / "m"
    save_pretrained(make_model(), folder)
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(doc, format_version=99)))
    with pytest.raises(HubError, match="newer unclip"):
        load_config(folder)
    (folder / "config.json").write_text(json.dumps(dict(doc, type="nonesuch")))
    with pytest.raises(HubError, match="unknown model type 'nonesuch'"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(doc, config={"dim": 8, "colour": 1})))
    with pytest.raises(HubError, match="unknown key 'colour'"):
        from_pretrained(folder)
    with pytest.raises(HubError, match="not a model folder"):
        from_pretrained(tmp_path / "nowhere")


def test_corrupt_safetensors_is_refused(tmp_path):
    folder = tmp_path / "m"
    save_pretrained(make_model(), folder)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(HubError, match="not a valid safetensors file"):
        from_pretrained(folder)


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("allow_legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, allow_legacy):
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    save_pretrained(make_model(), folder)
    (folder / WEIGHTS_NAME).unlink()
    evil = folder / "pytorch_model.bin"
    evil.write_bytes(pickle.dumps({"net.0.weight": _Exploit(marker)}))
    with pytest.raises(UnsafeWeightsError) as info:
        from_pretrained(folder, allow_legacy=allow_legacy)
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(UnsafeWeightsError):
        load_state_dict(evil, allow_legacy=allow_legacy)
    with pytest.raises(UnsafeWeightsError):
        from_pretrained(evil, allow_legacy=allow_legacy)
    assert not marker.exists(), "the pickle's payload ran"


def test_plain_legacy_tensor_file_loads_with_opt_in(tmp_path):
    model = make_model()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UnsafeWeightsError, match="refusing a pickle-based weights file"):
        load_state_dict(path)
    state = load_state_dict(path, allow_legacy=True)
    assert torch.equal(state["net.0.weight"], model.net[0].weight)


def test_meta_model_builds_on_meta_and_leaves_other_threads_initialising():
    """A meta build skips initialisation for its own thread only: a model built at the same
    time in another thread (a server loading a pipeline) gets its random weights."""
    import threading

    other: dict[str, torch.Tensor] = {}

    def build(config):
        def elsewhere():
            torch.manual_seed(0)
            layer = torch.nn.Linear(64, 64)
            other["weight"], other["bias"] = layer.weight, layer.bias
            other["normal"] = torch.nn.init.normal_(torch.zeros(256), std=1.0)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        return ToyModel(config)

    model = meta_model(build, ToyConfig(dim=6, hidden=12))
    assert all(p.is_meta for p in model.parameters())
    assert model.state_dict().keys() == make_model(dim=6, hidden=12).state_dict().keys()
    assert all(not t.is_meta for t in other.values())
    assert other["weight"].std() > 0.05 and other["normal"].std() > 0.5  # initialised


def test_meta_model_imports_no_compiler_stack():
    """Random fills of meta tensors go through torch's Python decompositions, whose first
    use imports torch._dynamo and sympy (a second or more); meta_model skips them."""
    from python_child import run_python

    code = (
        "import sys; from unclip.hub import meta_model; "
        "from unclip.prior.model import DiffusionPriorTransformer, PriorConfig; "
        "m = meta_model(DiffusionPriorTransformer, PriorConfig(clip_dim=8, text_dim=8, "
        "text_len=4, width=16, layers=1, heads=2)); "
        "assert all(p.is_meta for p in m.parameters()); "
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))"
    )
    assert run_python(code).strip() == "[]"
