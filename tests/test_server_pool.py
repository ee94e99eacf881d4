"""The server's pool is a core `DistilledMemory`: an unbudgeted pool stores validated sets as they are, by node,
in the one memory file format; the strategies' `SyntheticMemory` applies the "all" / "latest" policy on top of it,
and a server checkpoint keeps the pool in that format and validates every set against the strategy's limits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedcl.flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedcl.flower.records import model_to_arrays
from fedcl.memory import INDEX_FILE, DistilledMemory
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError
from strategies import SyntheticMemory, TrafficLog


def _set(classes: list[int], seed: int, **extra) -> SyntheticSet:
    labels = torch.tensor(classes).repeat_interleave(2)
    images = torch.randn(len(labels), 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return SyntheticSet(images, labels, SyntheticMeta("dm", 3, 2, extra=extra))


def test_a_pool_has_no_budget_and_only_stores_sets_as_they_are():
    with pytest.raises(ValueError, match="exactly one memory budget"):
        DistilledMemory()
    with pytest.raises(ValueError, match="or none for an unbudgeted pool"):
        DistilledMemory(10, unbudgeted=True)
    pool = DistilledMemory.pool()
    assert pool.unbudgeted and len(pool) == 0 and pool.next_key() == 0
    with pytest.raises(ValueError, match="stores sets as they are"):
        pool.add(0, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), None, n_classes=3)
    with pytest.raises(ValueError, match="stores sets as they are"):
        pool.resize(5)
    with pytest.raises(ValueError, match="node must be a non-negative integer"):
        pool.put(0, _set([0], 0), node=-1)


def test_put_records_the_node_and_replaces_the_bookkeeping_a_set_arrives_with():
    pool = DistilledMemory.pool()
    forged = _set([0, 1], 0, node=99, step=1000, task_label="x", absorbed=5, iterations=7)
    stored = pool.put(3, forged, node=12)
    assert stored.meta.extra == {"iterations": 7, "task_label": 0, "step": 1, "node": 12}
    assert torch.equal(stored.images, forged.images) and torch.equal(stored.labels, forged.labels)
    pool.put(1, _set([2], 1), node=11)
    pool.put(7, _set([1], 2), node=12)
    assert pool.next_key() == 8 and pool.keys_of(12) == [3, 7] and pool.keys_of(5) == []
    # nodes in the order of their first held key, each node's sets in key order
    assert list(pool.by_node()) == [11, 12] and [s.classes() for s in pool.by_node()[12]] == [[0, 1], [1]]
    assert len(pool) == 8 and pool.capacity() == 8 and pool.fit_budget() == []


def test_a_pool_round_trips_in_the_memory_format_and_is_checked_against_limits(tmp_path):
    pool = DistilledMemory.pool()
    for key, node in enumerate((5, 6, 5)):
        pool.put(key, _set([key % 3], key), node=node)
    pool.save(tmp_path)
    assert json.loads((tmp_path / INDEX_FILE).read_text())["files"] == {
        "0": "set-000.safetensors", "1": "set-001.safetensors", "2": "set-002.safetensors"}
    again = DistilledMemory.pool()
    again.load(tmp_path, image_shape=(1, 4, 4), n_classes=3, max_images=10, max_bytes=2**20)
    assert {n: [s.to_bytes() for s in sets] for n, sets in again.by_node().items()} == \
        {n: [s.to_bytes() for s in sets] for n, sets in pool.by_node().items()}
    assert again.step == 3 and again.put(again.next_key(), _set([0], 9), node=7).meta.extra["step"] == 4
    with pytest.raises(SyntheticSetError, match="set-000.safetensors: .*image"):
        DistilledMemory.pool().load(tmp_path, image_shape=(1, 8, 8), n_classes=3)
    with pytest.raises(SyntheticSetError, match="oversize"):
        DistilledMemory.pool().load(tmp_path, max_images=1)
    nodeless = DistilledMemory(images_per_class=2)
    nodeless.sets[0] = _set([0], 0)
    with pytest.raises(SyntheticSetError, match="extra.node must be a non-negative integer"):
        DistilledMemory.pool().restore(nodeless.dump())
    assert len(DistilledMemory(images_per_class=2).restore(nodeless.dump())["files"]) == 1  # a budgeted memory


def _memory(policy: str) -> SyntheticMemory:
    return SyntheticMemory(image_shape=(1, 4, 4), n_classes=3, max_images=10, max_bytes=2**20, policy=policy)


def test_the_policies_keep_the_order_of_the_nodes_first_arrival():
    """Pooled images come node by node, in the order the nodes first arrived: "latest" replaces a node's set in its
    place, "all" appends to the node's sets."""
    arrivals = [(11, _set([0], 0)), (12, _set([1], 1)), (12, _set([2], 2)), (11, _set([1], 3))]
    for policy, expected in (("all", [[0], [1], [1], [2]]), ("latest", [[1], [2]])):
        memory = _memory(policy)
        for node, synset in arrivals:
            memory.add(node, synset)
        assert list(memory.sets) == [11, 12]
        assert [s.classes() for sets in memory.sets.values() for s in sets] == expected
        images, labels = memory.pooled()
        assert labels.tolist() == [c for classes in expected for c in classes for _ in range(2)]
        assert len(memory) == len(images) == len(memory.store)


def test_a_checkpoint_keeps_the_pool_in_the_memory_format_and_validates_it(tmp_path, csv_row):
    memory = _memory("all")
    for node, seed in ((5, 0), (6, 1)):
        memory.add(node, _set([seed], seed))
    arrays = model_to_arrays(torch.nn.Linear(2, 2))
    rows = [csv_row(0), csv_row(1)]
    save_checkpoint(tmp_path, settings={}, server_round=1, arrays=arrays, rows=rows, traffic=TrafficLog(),
                    memory=memory)
    folder = tmp_path / "checkpoint" / "memory-0001"
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["memory"] == "memory-0001"
    assert list(DistilledMemory.pool().load(folder)["files"]) == ["0", "1"]  # readable as a plain core memory
    restored = _memory("all")
    assert load_checkpoint(tmp_path, settings={}, reference=arrays, memory=restored).server_round == 1
    assert [s.to_bytes() for s in restored.store.sets.values()] == [s.to_bytes() for s in memory.store.sets.values()]
    other = SyntheticMemory(image_shape=(1, 4, 4), n_classes=2, max_images=10, max_bytes=2**20)
    with pytest.raises(CheckpointError, match="set-000.safetensors: set is for 3 classes, expected 2"):
        load_checkpoint(tmp_path, settings={}, reference=arrays, memory=other)
    with pytest.raises(CheckpointError, match="keeps none"):
        load_checkpoint(tmp_path, settings={}, reference=arrays, memory=None)
    tampered = replace(memory.store.sets[0], meta=replace(memory.store.sets[0].meta, extra={"task_label": 0}))
    (folder / "set-000.safetensors").write_bytes(tampered.to_bytes())
    with pytest.raises(CheckpointError, match="set-000.safetensors: .*extra.node"):
        load_checkpoint(tmp_path, settings={}, reference=arrays, memory=_memory("all"))
    save_checkpoint(tmp_path, settings={}, server_round=2, arrays=arrays, rows=[*rows, csv_row(2)],
                    traffic=TrafficLog(), memory=None)
    assert not list((tmp_path / "checkpoint").glob("memory-*"))
    with pytest.raises(CheckpointError, match="holds no synthetic memory but this run's strategy keeps one"):
        load_checkpoint(tmp_path, settings={}, reference=arrays, memory=_memory("all"))
