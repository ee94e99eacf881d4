"""The poisoning screen (`fedcl.screen`): label-flipped and noise sets stand out among honest ones, clean groups
pass, the strategies' memory refuses the outliers as counted failures, and a real Flower simulation with the screen
on completes with the poisoned client screened out."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fedcl.data import load_dataset, partition
from fedcl.distill import Source, create_distiller
from fedcl.flower.records import synset_to_record
from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import SyntheticSet
from strategies import SyntheticMemory, TrafficLog


def _honest_sets(scheme: str, n_clients: int = 10, alpha: float = 0.5) -> list[SyntheticSet]:
    """One 10-images-per-class set of real digits per client partition (what an honest client could send)."""
    data = load_dataset("digits")
    parts = partition(data.train_labels, n_clients, scheme, alpha=alpha, seed=0)
    return [create_distiller("random", seed=i).distill(data.train_images[p], data.train_labels[p], ipc=10,
                                                        n_classes=10, source=Source.of(data))
            for i, p in enumerate(parts)]


def _flipped(synset: SyntheticSet) -> SyntheticSet:
    return replace(synset, labels=9 - synset.labels)


def _noise(synset: SyntheticSet) -> SyntheticSet:
    return replace(synset, images=torch.randn(synset.images.shape, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_screen_flags_label_flipped_and_noise_sets_among_honest_ones(scheme):
    sets = _honest_sets(scheme)
    sets[3], sets[7] = _flipped(sets[3]), _noise(sets[7])
    verdict = EmbeddingScreen()(sets)
    assert verdict.outliers == [3, 7], verdict.scores
    assert verdict.kept() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert "embedding score" in verdict.reasons[3] and "threshold" in verdict.reasons[7]
    honest = [s for i, s in enumerate(verdict.scores) if i not in (3, 7)]
    assert min(verdict.scores[3], verdict.scores[7]) > max(honest)


def test_screen_keeps_every_honest_set():
    verdict = EmbeddingScreen()(_honest_sets("dirichlet"))
    assert verdict.outliers == [] and len(verdict.scores) == 10
    assert all(0 < s < EmbeddingScreen().threshold for s in verdict.scores)


def _one_odd_class(synset: SyntheticSet) -> SyntheticSet:
    """An honest set under label skew: only classes 0-2, and class 0's images blown out (a class distilled from a
    handful of real images can have such an off class mean)."""
    keep = synset.hard_labels < 3
    images = synset.images[keep].clone()
    images[synset.hard_labels[keep] == 0] = 3.0
    return replace(synset, images=images, labels=synset.labels[keep])


def test_one_odd_class_does_not_get_an_honest_set_refused_but_a_flipped_set_is():
    sets = _honest_sets("iid")
    sets[0], sets[1] = _one_odd_class(sets[0]), _flipped(sets[1])
    screen = EmbeddingScreen()
    verdict = screen(sets)
    assert verdict.outliers == [1], verdict.scores
    per_class = screen.class_scores(sets)
    assert per_class[0, 0] > 2 * screen.threshold  # the odd class itself is far off ...
    assert per_class[0].nanmean() > screen.threshold  # ... so a mean over the classes would have refused set 0
    assert verdict.scores[0] < 1.5 < screen.threshold < verdict.scores[1]


def test_the_threshold_decides_and_must_be_positive():
    sets = _honest_sets("iid")
    sets[1] = _flipped(sets[1])
    scores = EmbeddingScreen(seed=0)(sets).scores
    assert EmbeddingScreen(seed=0, threshold=scores[1] + 0.01)(sets).outliers == []
    assert EmbeddingScreen(seed=0, threshold=max(scores) - 0.01)(sets).outliers == [1]
    with pytest.raises(ValueError, match="threshold must be > 0"):
        EmbeddingScreen(threshold=0.0)


def test_too_few_sets_are_not_judged():
    sets = _honest_sets("iid", n_clients=2)
    verdict = EmbeddingScreen()([sets[0], _noise(sets[1])])
    assert verdict.outliers == [] and all(s != s for s in verdict.scores)  # NaN: no peers to compare with


def test_the_screen_networks_come_from_secret_randomness_not_the_run_seed():
    seeds = {EmbeddingScreen().seed for _ in range(4)} | {create_screen("embedding").seed for _ in range(4)}
    assert len(seeds) == 8  # drawn by `secrets`: a client knowing the run's seed cannot rebuild the networks


def test_a_set_without_a_score_is_refused_when_there_are_peers():
    sets = _honest_sets("iid")
    sets[2] = SyntheticSet(torch.full_like(sets[2].images, float("inf")), sets[2].labels, sets[2].meta)
    verdict = EmbeddingScreen(seed=0)(sets)
    assert 2 in verdict.outliers and "screened out" in verdict.reasons[2]
    assert not any(verdict.scores[i] != verdict.scores[i] for i in verdict.kept())  # every kept set has a score


def test_create_screen_by_name():
    assert create_screen("none") is None
    assert create_screen("embedding", seed=3) == EmbeddingScreen(seed=3)
    assert create_screen("embedding", seed=3, threshold=4.0) == EmbeddingScreen(seed=3, threshold=4.0)
    assert create_screen("none", threshold=4.0) is None
    with pytest.raises(ValueError, match="unknown screen 'median'"):
        create_screen("median")


def _reply(node: int, synset: SyntheticSet) -> SimpleNamespace:
    """What `SyntheticMemory.accept` reads of a Flower reply: content, source node, error flag."""
    return SimpleNamespace(content=synset_to_record(synset), metadata=SimpleNamespace(src_node_id=node),
                           has_error=lambda: False)


def test_memory_refuses_screened_sets_and_counts_them():
    sets = _honest_sets("iid", n_clients=6)
    sets[0] = _flipped(sets[0])
    traffic = TrafficLog()
    memory = SyntheticMemory(image_shape=(1, 8, 8), n_classes=10, max_images=100, max_bytes=2**20,
                             screen=EmbeddingScreen())
    accepted = memory.accept(1, [_reply(100 + i, s) for i, s in enumerate(sets)], traffic)
    assert accepted == 5 and sorted(memory.sets) == [101, 102, 103, 104, 105]
    assert traffic[1].screened == 1 and traffic[1].failures[0][0] == 100
    assert "screened out" in traffic[1].failures[0][1]
    unscreened = SyntheticMemory(image_shape=(1, 8, 8), n_classes=10, max_images=100, max_bytes=2**20)
    assert unscreened.accept(1, [_reply(100 + i, s) for i, s in enumerate(sets)], TrafficLog()) == 6


def _flipping_client_app():
    """The real ClientApp's distill handler, except partition 0 flips every label of the set it uploads."""
    from flwr.app import Array, Context, Message
    from flwr.clientapp import ClientApp

    from fedcl.flower import client_app

    app = ClientApp()

    @app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        reply = client_app.distill(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            arrays = reply.content["synthetic"]
            arrays["labels"] = Array(9 - arrays["labels"].numpy())
        return reply

    return app


@pytest.mark.slow
def test_flower_simulation_with_the_screen_drops_the_poisoned_client(tmp_path, monkeypatch):
    from fedcl.flower import client_app
    from fedcl.flower.settings import FedSettings
    from fedcl.flower.simulation import QUIET_ENV, simulate

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(client_app, "app", _flipping_client_app())
    settings = FedSettings(dataset="digits", partitioner="iid", width=16, distill_iterations=10, batch_real=32,
                           server_epochs=30, min_nodes=5, strategy="fed-distill", screen="embedding",
                           init="real", out_dir=str(tmp_path))  # 10 iterations from noise carry too little class
    rows = simulate(settings, 5)                               # signal for a flipped set to stand out
    last = rows[-1]
    assert int(last["clients_failed"]) == 1 and int(last["replies_ok"]) == 4, last
    assert "screened out as an outlier" in last["failure_reasons"]
    assert float(last["accuracy"]) > float(rows[0]["accuracy"]) + 0.3
