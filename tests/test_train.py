"""The shared training loop and the evaluation protocol."""

import pytest
import torch

from fedcl.data import load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.models import create_model
from fedcl.train import EvalResult, TrainConfig, evaluate_model, evaluate_synthetic, train_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_training_on_real_data_learns(digits):
    net = create_model("convnet", digits.image_shape, 10, width=16, depth=2)
    before = evaluate_model(net, digits.test_images, digits.test_labels, device="cpu")
    losses = train_model(net, digits.train_images, digits.train_labels, TrainConfig(epochs=6, batch_size=32, lr=0.05),
                         device="cpu")
    after = evaluate_model(net, digits.test_images, digits.test_labels, device="cpu")
    assert losses[-1] < losses[0] and after > max(0.8, before + 0.3)


def test_soft_labels_train(digits):
    net = create_model("mlp", digits.image_shape, 10, width=32)
    soft = torch.nn.functional.one_hot(digits.train_labels, 10).float() * 0.9 + 0.01
    train_model(net, digits.train_images, soft, TrainConfig(epochs=10, batch_size=32, lr=0.05, dsa=False), device="cpu")
    assert evaluate_model(net, digits.test_images, digits.test_labels, device="cpu") > 0.8


def test_evaluate_synthetic_reports_every_model(digits):
    synset = create_distiller("random", seed=0).distill(digits.train_images, digits.train_labels, ipc=5,
                                                        source=Source.of(digits))
    result = evaluate_synthetic(synset, digits, model_cfg={"width": 16, "depth": 2}, n_models=2,
                                config=TrainConfig(epochs=30), device="cpu")
    assert isinstance(result, EvalResult) and len(result.accuracies) == 2
    assert 0.5 < result.mean <= 1 and "2 models" in str(result)
    again = evaluate_synthetic(synset, digits, model_cfg={"width": 16, "depth": 2}, n_models=2,
                               config=TrainConfig(epochs=30), device="cpu")
    assert again.accuracies == result.accuracies  # seeded


def test_evaluate_synthetic_rejects_mismatched_sets(digits):
    fashion_like = create_distiller("random").distill(torch.randn(20, 1, 28, 28), torch.arange(20) % 10, ipc=1)
    from fedcl.synthetic import SyntheticSetError

    with pytest.raises(SyntheticSetError, match="expected"):
        evaluate_synthetic(fashion_like, digits, n_models=1, config=TrainConfig(epochs=1))
