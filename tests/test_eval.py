"""Retrieval recall and zero-shot accuracy on hand-made embeddings."""

from __future__ import annotations

import torch

from unclip.eval.clip_eval import (
    class_embeddings,
    recall_at_k,
    retrieval_metrics,
    zero_shot_accuracy,
)


def test_recall_at_k_counts_the_match_position():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # match (col 0) ranked 1st
            [0.8, 0.5, 0.1],  # match (col 1) ranked 2nd
            [0.7, 0.6, 0.1],  # match (col 2) ranked 3rd
        ]
    )
    assert recall_at_k(scores, 1) == torch.tensor(1 / 3).item()
    assert recall_at_k(scores, 2) == torch.tensor(2 / 3).item()
    assert recall_at_k(scores, 5) == 1.0


def test_retrieval_metrics_perfect_and_shuffled():
    emb = torch.nn.functional.normalize(
        torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    perfect = retrieval_metrics(emb, emb)
    assert perfect["text_to_image_r@1"] == 1.0 and perfect["image_to_text_r@1"] == 1.0
    shuffled = retrieval_metrics(emb, emb.roll(1, dims=0))
    assert shuffled["text_to_image_r@1"] < 0.2


def test_zero_shot_accuracy_overall_and_per_class():
    classes = ["a", "b"]
    class_emb = torch.eye(2)
    image_emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    truth = ["a", "a", "b", "b"]  # the last one is wrong
    acc = zero_shot_accuracy(image_emb, truth, class_emb, classes)
    assert acc["accuracy"] == 0.75
    assert acc["mean_per_class"] == 0.75


def test_class_embeddings_average_the_templates_of_each_class():
    vectors = {"a x": [1.0, 0.0], "b x": [0.0, 1.0], "a y": [0.0, 1.0], "b y": [0.0, 1.0]}

    def encode(texts):
        return torch.tensor([vectors[t] for t in texts])

    emb = class_embeddings(encode, ["{} x", "{} y"], ["a", "b"])
    assert torch.allclose(emb[0], torch.tensor([0.5, 0.5]).sqrt())  # mean of x and y, unit
    assert torch.allclose(emb[1], torch.tensor([0.0, 1.0]))


def test_linear_map_recovers_a_linear_relation():
    from unclip.eval.prior_eval import fit_linear_map, linear_map_predict

    g = torch.Generator().manual_seed(0)
    z_t = torch.nn.functional.normalize(torch.randn(200, 6, generator=g), dim=-1)
    a = torch.randn(6, 6, generator=g)
    z_i = torch.nn.functional.normalize(z_t @ a + 0.1, dim=-1)
    w = fit_linear_map(z_t, z_t @ a + 0.1, ridge=1e-6)
    pred = linear_map_predict(w, z_t)
    assert (pred * z_i).sum(-1).mean() > 0.999


def test_frechet_distance_closed_form_and_identity():
    from unclip.eval.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g)
    assert frechet_distance(x, x) < 1e-6
    # N(0, I) vs N(m, 4I): |m|² + 3 + 12 - 2·tr(2I) = |m|² + 3
    y = 2 * torch.randn(4000, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
    assert abs(frechet_distance(x, y) - 4.0) < 0.3


def test_kernel_distance_near_zero_for_same_distribution():
    from unclip.eval.metrics import kernel_distance

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
    z = torch.randn(500, 4, generator=g) + 1.0
    same, different = kernel_distance(x, y), kernel_distance(x, z)
    assert abs(same) < 0.05 and different > 10 * abs(same) and different > 0.1


def test_clip_score_is_mean_cosine():
    from unclip.eval.metrics import clip_score

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert abs(clip_score(a, b) - (2**-0.5 + 1) / 2) < 1e-9
