"""Retrieval recall and zero-shot accuracy on hand-made embeddings."""

from __future__ import annotations

import torch

from unclip.eval.clip_eval import recall_at_k, retrieval_metrics, zero_shot_accuracy


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


def test_linear_map_recovers_a_linear_relation():
    from unclip.eval.prior_eval import fit_linear_map, linear_map_predict

    g = torch.Generator().manual_seed(0)
    z_t = torch.nn.functional.normalize(torch.randn(200, 6, generator=g), dim=-1)
    a = torch.randn(6, 6, generator=g)
    z_i = torch.nn.functional.normalize(z_t @ a + 0.1, dim=-1)
    w = fit_linear_map(z_t, z_t @ a + 0.1, ridge=1e-6)
    pred = linear_map_predict(w, z_t)
    assert (pred * z_i).sum(-1).mean() > 0.999
