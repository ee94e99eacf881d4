"""The standard-scenario ClientApp's choice of what to distil."""

from __future__ import annotations

import pytest
import torch

from fedcl.flower.client_app import well_held_classes


def test_a_client_distils_only_the_classes_it_holds_enough_images_of():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    images = torch.arange(8.0).view(8, 1, 1, 1)
    kept_images, kept_labels = well_held_classes(images, labels, 3)
    assert kept_labels.tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert kept_images.flatten().tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert well_held_classes(images, labels, 1)[1].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="min-class-images"):
        well_held_classes(images, labels, 5)
