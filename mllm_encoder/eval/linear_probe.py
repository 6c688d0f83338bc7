"""Linear probes on frozen embeddings: how much of an attribute a representation carries, linearly."""

from typing import Optional

import torch


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: Optional[int] = None,
    ridge: float = 1e-2,
) -> float:
    """Test accuracy (percent) of a least-squares (ridge) linear classifier fitted on the training features.

    Features are standardised with the training statistics (plus a constant column); the weights solve
    ``min |X W - Y|^2 + ridge * N * |W|^2`` against one-hot targets in closed form (float64), so the result is
    deterministic and costs one small linear solve; the prediction is the arg-max of ``X W``.
    """
    if train_features.ndim != 2 or train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features must be [N, D] with one label per row")
    if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1]:
        raise ValueError("test_features must be [M, D] with the training features' D")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    x = train_features.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)

    def design(features: torch.Tensor) -> torch.Tensor:
        standard = (features.double() - mean) / std
        return torch.cat([standard, torch.ones(len(standard), 1, dtype=torch.float64)], dim=1)

    x = design(train_features)
    targets = torch.nn.functional.one_hot(train_labels.long(), num_classes).double()
    gram = x.t() @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, x.t() @ targets)
    predictions = (design(test_features) @ weight).argmax(dim=1)
    return 100.0 * (predictions == test_labels.long()).double().mean().item()
