"""The autoregressive prior (DALL·E 2 §2.2): code book, masking, sampling, training, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_stages import shapes, tiny_clip_and_embeddings, tokenizer_dir  # noqa: F401 (fixtures)
from unclip.cli import main
from unclip.hub import from_pretrained, save_pretrained
from unclip.prior.ar import (
    ARPrior,
    ARPriorConfig,
    filter_logits,
    ordinal_targets,
    sample_logits,
)
from unclip.prior.codebook import fit_codebook

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _low_rank(n: int, d: int = 32, rank: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, 0.3, rank)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q.T  # [rank, d]
    z = (torch.randn(n, rank, generator=g) * scales) @ basis + 0.7 * basis[0]
    return _unit(z + 0.003 * torch.randn(n, d, generator=g))


def _model(cb, text_dim: int = 8, text_len: int = 6, **kw) -> ARPrior:
    k, b = cb.components.shape[0], cb.centres.shape[1]
    cfg = ARPriorConfig(
        clip_dim=cb.mean.shape[0], text_dim=text_dim, text_len=text_len, components=k, buckets=b,
        dot_buckets=cb.dot_edges.shape[0] + 1, width=32, layers=2, heads=2, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ARPrior(cfg)
    model.load_codebook(cb)
    return model.eval()


@pytest.fixture(scope="module")
def small():
    """A fitted code book on 300 random pairs (D=16) and a model with random weights."""
    g = torch.Generator().manual_seed(1)
    z_i = _unit(torch.randn(300, D, generator=g) @ torch.randn(D, D, generator=g))
    z_t = _unit(z_i + 0.6 * torch.randn(300, D, generator=g))
    cb = fit_codebook(z_i, z_t, components=6, buckets=32, dot_buckets=8)
    return z_i, z_t, cb, _model(cb)


def test_pca_quantisation_round_trip_error_is_bounded(capsys):
    z = _low_rank(2000)
    cb = fit_codebook(z, buckets=64)  # components by the 99% variance rule
    k = cb.components.shape[0]
    assert k <= 7 and float(cb.explained.sum()) >= 0.99  # rank 6 + tiny noise
    torch.testing.assert_close(cb.components @ cb.components.T, torch.eye(k), atol=1e-5, rtol=0)
    codes = cb.encode(z)
    assert codes.shape == (2000, k) and codes.min() >= 0 and codes.max() <= 63
    cos = (cb.decode(codes) * z).sum(-1)
    with capsys.disabled():
        print(f"\nAR code book: K={k}, 64 buckets, round-trip cos mean {cos.mean():.5f} "
              f"min {cos.min():.5f}")  # fmt: skip
    assert cos.mean() > 0.999 and cos.min() > 0.97  # the worst: an outlier in an end bucket
    # per component, a value decodes to its bucket's centre: error within the bucket width
    y = (z - cb.mean) @ cb.components.T
    y_hat = cb.centres.gather(1, codes.T).T
    width = (cb.edges[:, 1:] - cb.edges[:, :-1]).max()
    inner = (codes > 0) & (codes < 63)
    assert ((y - y_hat).abs()[inner] <= width + 1e-6).all()
    # quantile edges: buckets about equally full; the fit is deterministic
    counts = torch.bincount(codes[:, 0], minlength=64)
    assert counts.min() >= 20 and counts.max() <= 45
    again = fit_codebook(z, buckets=64)
    assert torch.equal(again.components, cb.components) and torch.equal(again.edges, cb.edges)
    # fewer components, larger error, still a unit vector
    cb2 = fit_codebook(z, components=2, buckets=64)
    rec2 = cb2.decode(cb2.encode(z))
    assert (rec2 * z).sum(-1).mean() < cos.mean()
    torch.testing.assert_close(rec2.norm(dim=-1), torch.ones(2000))


def test_causal_mask_no_token_sees_a_later_one(small):
    _, z_t, _, model = small
    k = model.config.components
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (2, k), generator=g)
    tokens = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dot = torch.tensor([3, 5])
    base = model(codes, z_t[:2], dot, tokens, mask)  # [2, K, B]
    assert base.shape == (2, k, 32)
    for j in range(k):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 7) % 32
        out = model(changed, z_t[:2], dot, tokens, mask)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1])  # rows ≤ j never see code j
        if j < k - 1:
            assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :])
    # padded caption tokens are invisible; real ones matter
    padded = tokens.clone()
    padded[0, 3:] = 100.0
    torch.testing.assert_close(model(codes, z_t[:2], dot, padded, mask)[0], base[0])
    tokens2 = tokens.clone()
    tokens2[0, 0] += 1.0
    assert not torch.allclose(model(codes, z_t[:2], dot, tokens2, mask)[0], base[0])


def test_sampling_is_seeded_and_the_kv_cache_changes_nothing(small):
    _, z_t, _, model = small
    tokens = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))

    def draw(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.sample_codes(z_t[:3], tokens, None, generator=g, top_p=0.9, **kw)

    a, b = draw(5, guidance=2.0), draw(5, guidance=2.0, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, draw(5, guidance=2.0))
    assert not torch.equal(a, draw(6, guidance=2.0))
    z = model.sample(z_t[:3], tokens, generator=torch.Generator().manual_seed(5), guidance=2.0,
                     top_p=0.9)  # fmt: skip
    torch.testing.assert_close(z, model.decode(a))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_top_k_top_p_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    p = logits.softmax(-1)[0]  # ≈ 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(filter_logits(logits, top_p=0.8)[0])
    assert kept.tolist() == [True, True, False, False] and p[0] < 0.8 < p[:2].sum()
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True] + [False] * 3
    assert sample_logits(logits.repeat(5, 1), temperature=0).tolist() == [0] * 5
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.repeat(4000, 1), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, p, atol=0.03, rtol=0)


def test_guidance_scale_semantics(small):
    _, z_t, _, model = small
    n = 3
    tokens = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(3))
    dot = torch.tensor([7, 6, 5])

    def draw(**kw):
        g = torch.Generator().manual_seed(11)
        return model.sample_codes(z_t[:n], tokens, None, dot_code=dot, generator=g, **kw)

    yes, no = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    # 1 = the conditional model alone; 0 = the unconditional (null caption) model alone
    assert torch.equal(draw(guidance=1.0), draw(guidance=1.0, drop_text=no))
    assert torch.equal(draw(guidance=0.0), draw(guidance=1.0, drop_text=yes))
    assert not torch.equal(draw(guidance=1.0), draw(guidance=0.0))
    # s: logits u + s (c - u) (greedy: the first code is the argmax of the guided logits)
    codes = torch.zeros(n, model.config.components, dtype=torch.long)
    c = model(codes, z_t[:n], dot, tokens, drop_text=no)[:, 0]
    u = model(codes, z_t[:n], dot, tokens, drop_text=yes)[:, 0]
    for s in (0.0, 1.0, 3.0):
        first = draw(guidance=s, temperature=0)[:, 0]
        assert torch.equal(first, (u + s * (c - u)).argmax(-1))


def test_loss_decreases_and_a_tiny_overfit_samples_the_truth():
    """64 synthetic (z_t, z_i) pairs: after 250 steps greedy samples decode to mean cos > 0.9
    with the true z_i (the code book's own round trip, the ceiling, is about 0.95 here)."""
    g = torch.Generator().manual_seed(0)
    z_t = _unit(torch.randn(64, D, generator=g))
    z_i = _unit(z_t @ torch.randn(D, D, generator=g) + 0.3)
    cb = fit_codebook(z_i, z_t, components=8, buckets=16, dot_buckets=4)
    model = _model(cb, text_dim=0, text_drop_prob=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        loss, _acc = model.loss(z_i, z_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    truth_rt = (cb.decode(cb.encode(z_i)) * z_i).sum(-1).mean()  # the code book's ceiling
    z = model.sample(z_t, dot_code=model.dot_code(z_i, z_t), temperature=0)
    cos = (z * z_i).sum(-1).mean()
    assert cos > 0.9 and cos > truth_rt - 0.05, (float(cos), float(truth_rt))


def test_ordinal_targets_are_gaussians_around_the_code():
    codes = torch.tensor([0, 5, 9])
    t = ordinal_targets(codes, 10, sigma=1.0)  # [3, 10]
    torch.testing.assert_close(t.sum(-1), torch.ones(3))
    assert t.argmax(-1).tolist() == [0, 5, 9]
    # symmetric around an inner code, and a near miss gets more than a far one
    assert t[1, 4] == pytest.approx(t[1, 6].item()) and t[1, 4] > t[1, 3] > t[1, 2]
    assert t[1, 4] / t[1, 5] == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), rel=1e-5)
    sharp = ordinal_targets(codes, 10, sigma=0.05)
    torch.testing.assert_close(sharp, F.one_hot(codes, 10).float())


def test_smoothed_loss_is_cross_entropy_with_the_soft_targets(small):
    z_i, z_t, cb, _ = small
    plain = _model(cb, text_dim=0)
    smooth = _model(cb, text_dim=0, smoothing=2.0)
    smooth.load_state_dict(plain.state_dict())
    codes = plain.encode(z_i[:20])
    logits = plain(codes, z_t[:20], plain.dot_code(z_i[:20], z_t[:20])).reshape(-1, 32)
    soft = ordinal_targets(codes.reshape(-1), 32, 2.0)
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    got, _ = smooth.loss(z_i[:20], z_t[:20])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(plain.loss(z_i[:20], z_t[:20])[0], got)
    with pytest.raises(ValueError, match="smoothing must be"):
        ARPriorConfig(clip_dim=16, text_dim=0, components=4, buckets=8, smoothing=-1.0)


def test_code_inputs_carry_the_bucket_value(small):
    """Neighbouring buckets get nearby inputs through the value feature (buckets are ordered),
    even where the per-bucket embeddings are identical."""
    *_, cb, _ = small
    model = _model(cb, text_dim=0)
    with torch.no_grad():
        model.code_emb.weight.zero_()
        h = model.embed_codes(torch.tensor([[0, 1, 31, 0, 0, 0]]), start=0)[0]  # [K=6, W]
    pos = model.pos_emb[model.config.text_len + 2 :][:6]
    v = (h - pos).detach()
    assert (v[0] - v[1]).norm() < (v[0] - v[2]).norm()  # bucket 0 is nearer 1 than 31


def test_save_and_load_give_identical_outputs(small, tmp_path):
    _, z_t, _, model = small
    folder = save_pretrained(model, tmp_path / "ar")
    assert json.loads((folder / "config.json").read_text())["type"] == "ar_prior"
    loaded = from_pretrained(folder)
    assert isinstance(loaded, ARPrior) and loaded.config == model.config
    for name in ("pca_mean", "pca_components", "bucket_edges", "bucket_centres", "dot_edges"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    codes = torch.randint(0, 32, (2, model.config.components))
    dot = torch.tensor([1, 2])
    torch.testing.assert_close(
        loaded(codes, z_t[:2], dot), model(codes, z_t[:2], dot), rtol=0, atol=0
    )

    def draw(m):
        return m.sample(z_t[:2], generator=torch.Generator().manual_seed(4), guidance=2.0)

    assert torch.equal(draw(loaded), draw(model))
    with pytest.raises(ValueError, match="components"):
        ARPrior(ARPriorConfig(clip_dim=D, components=0))


def test_cli_trains_and_evaluates_an_ar_prior(tiny_clip_and_embeddings, tmp_path, capsys):  # noqa: F811
    clip_dir, emb = tiny_clip_and_embeddings
    cfg = {
        "model": {"clip_dim": 16, "text_dim": 32, "text_len": 12, "width": 32, "layers": 1,
                  "heads": 2, "buckets": 16, "dot_buckets": 4, "variance": 0.95},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
        "data": {"embeddings": str(emb)},
        "clip": str(clip_dir),
    }  # fmt: skip
    path = tmp_path / "ar.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    args = ["train", "prior", "--type", "ar", "--config", str(path), "--run-dir", str(run),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "PCA keeps" in capsys.readouterr().out
    final = run / "final"
    model = from_pretrained(final)
    assert isinstance(model, ARPrior) and 1 <= model.config.components <= 16
    assert float(model.pca_explained.sum()) >= 0.95
    assert not (final / "diffusion.json").exists()
    assert json.loads((run / "run_config.json").read_text())["type"] == "ar"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "code_acc" in metrics[-1]
    # the run folder remembers the type: --resume needs no --type
    resume = ["train", "prior", "--run-dir", str(run), "--resume", "--steps", "3", "--no-progress"]
    assert main(resume) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    # a flag that contradicts the config is an error
    doc = {**cfg, "type": "diffusion"}
    path.write_text(json.dumps(doc))
    bad = [
        "train",
        "prior",
        "--type",
        "ar",
        "--config",
        str(path),
        "--run-dir",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2
    capsys.readouterr()
    args = ["eval", "prior", "--prior", str(final), "--clip", str(clip_dir), "--train-embeddings",
            str(emb), "--embeddings", str(emb), "--guidance", "2", "--top-p", "0.9", "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)["emb"]
    assert result["captions"] == 56
    for key in ("cos_text_embedding", "cos_linear_regression", "cos_prior"):
        assert -1.0 <= result[key] <= 1.0


def _ar_prior_folder(root: Path) -> Path:
    from tiny_pipeline import CONTEXT, EMBED, TEXT_WIDTH

    g = torch.Generator().manual_seed(0)
    z_i = _unit(torch.randn(200, EMBED, generator=g))
    cb = fit_codebook(z_i, _unit(z_i + torch.randn(200, EMBED, generator=g)), components=6,
                      buckets=16, dot_buckets=4)  # fmt: skip
    model = _model(cb, text_dim=TEXT_WIDTH, text_len=CONTEXT)
    return save_pretrained(model, root / "ar_prior")


def _ar_pipeline(tmp_path: Path) -> Path:
    """A tiny pipeline folder whose prior is an AR prior."""
    from tiny_pipeline import FAST_SAMPLING, write_stages
    from unclip.pipeline import assemble_pipeline

    stages = write_stages(tmp_path / "stages")
    return assemble_pipeline(
        tmp_path / "pipe", clip=stages["clip"], prior=_ar_prior_folder(tmp_path),
        decoder=stages["decoder"], upsamplers=[stages["upsampler"]], sampling=FAST_SAMPLING,
        dtype=torch.float32,
    )  # fmt: skip


def test_a_pipeline_with_an_ar_prior_generates_images(tmp_path):
    from unclip.pipeline import load_pipeline

    out = _ar_pipeline(tmp_path)
    assert not (out / "prior" / "diffusion.json").exists()
    pipe = load_pipeline(out, device="cpu")
    assert pipe.prior is not None and pipe.prior.diffusion is None
    seen = []
    images = pipe.text_to_image("a red square", n=2, seed=3, progress=lambda s, st: seen.append(s))
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    assert json.loads(images[0].info["sampler"])["prior"] == "autoregressive"
    assert seen.count("prior") == 2 * pipe.prior.model.config.components
    again = pipe.text_to_image("a red square", n=2, seed=3)[0]
    assert again.tobytes() == images[0].tobytes()
    pipe.max_batch = 1  # each image on its own: image 0 is exactly the single call's
    # (a random tiny decoder at guidance 8 magnifies batch rounding: no tolerance holds here)
    alone = pipe.text_to_image("a red square", n=2, seed=3)
    assert alone[0].tobytes() == pipe.text_to_image("a red square", n=1, seed=3)[0].tobytes()
    assert seen.count("prior") == 2 * pipe.prior.model.config.components
    settings = pipe.sampling_settings(prior_temperature=0.0, prior_top_k=3, prior_ar_guidance=1.0)
    assert settings.prior.top_k == 3 and settings.prior.temperature == 0.0
    text = pipe._text("a red square")
    z = pipe._sample_prior(text, 0, settings, None)  # greedy, unguided
    assert z.shape == (1, pipe.clip.config.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(pipe._sample_prior(text, 0, settings, None), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="top_p"):
        pipe.sampling_settings(prior_top_p=0.0)


def test_info_and_bench_handle_an_ar_prior(tmp_path, capsys):
    from test_bench import bench_args, run_json

    pipe = _ar_pipeline(tmp_path)
    assert main(["info", str(pipe), "--json"]) == 0
    rows = {Path(r["name"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["prior"]["type"] == "ar_prior" and rows["prior"]["flops"]["embedding"] > 0
    # a run config with a fitted component count; components 0 needs the trained folder
    config = tmp_path / "ar.json"
    doc = {"type": "ar", "model": {"clip_dim": 16, "text_dim": 0, "components": 5, "buckets": 8,
                                   "width": 32, "layers": 1, "heads": 2}}  # fmt: skip
    config.write_text(json.dumps(doc))
    assert main(["info", str(config), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["type"] == "ar_prior" and row["inputs"]["codes"] == [1, 5]
    doc["model"]["components"] = 0
    config.write_text(json.dumps(doc))
    assert main(["info", str(config)]) == 2
    assert f"{config}: components 0" in capsys.readouterr().err
    args = bench_args(str(pipe), "--quick", "--json", "--peak-fp32", "100", "--peak-bf16", "400",
                      "--doc", str(tmp_path / "bench.md"))  # fmt: skip
    r = run_json(args.func, args)
    prior = r["sampling"]["prior"]
    assert prior["sampler"] == "autoregressive" and prior["steps"] == 6
    assert prior["latency"]["median_s"] > 0 and prior["batch2"]["images"] == 2
    assert r["training"]["prior"]["samples_per_s"] > 0


def test_the_server_generates_with_an_ar_prior(tmp_path):
    from fastapi.testclient import TestClient

    from unclip.pipeline import load_pipeline
    from unclip.server import create_app

    folder = _ar_pipeline(tmp_path)
    with TestClient(create_app(load_pipeline(folder, device="cpu"))) as client:
        for body in ({"prompt": "a red square", "n": 2},
                     {"prompt": "a red square", "steps": 2, "prior_guidance": 2.0}):  # fmt: skip
            r = client.post("/v1/images/generations", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == body.get("n", 1)
