"""An engine replica's state folder and published rank (no Ray cluster started): state_folders.py."""

import threading

from scalesim.cluster.state_folders import claim_state_folder, claimed
from scalesim.memory.disk_store import DiskStore


def _claim(tmp_path, serve_rank: int, world_size: int, wait_s: float = 0.5) -> tuple[int, object]:
    claim = claim_state_folder(tmp_path, serve_rank, world_size, wait_s=wait_s)
    return claim.rank, claim


def test_a_replica_takes_its_serve_ranks_folder_and_holds_it_until_released(tmp_path):
    assert claim_state_folder(None, 3, 2).rank == 3 and claim_state_folder(None, 3, 2).folder is None
    rank, first = _claim(tmp_path, 1, 2)
    assert rank == 1 and first.folder == tmp_path / "replica-1"
    with claimed(first.folder) as ours:
        assert not ours, "held by the replica"
    (tmp_path / "replica-0").mkdir()  # a replica ran here under rank 0
    rank, second = _claim(tmp_path, 1, 2)
    assert rank == 0, "a claimed folder is never taken twice, even by a replica with that Serve rank"
    first.release()
    with claimed(tmp_path / "replica-1") as ours:
        assert ours, "released"
    assert _claim(tmp_path, 1, 2)[0] == 1, "released: a replica restarted under rank 1 finds its folder"


def test_a_folder_being_taken_in_is_not_claimed_meanwhile(tmp_path):
    with claimed(tmp_path / "replica-0") as ours:
        assert ours
        assert _claim(tmp_path, 0, 1, wait_s=0.2)[0] == 1, "another number, after waiting"


def test_a_rolling_update_keeps_ranks_below_the_replica_count(tmp_path):
    """Serve starts a new replica while the old one it replaces is stopping, and frees the old
    rank only once it has stopped: the new one gets rank 3 of 3. It waits for the stopping
    replica's folder instead of publishing 3 (the CI failure of stop 33: ranks [0, 2, 3])."""
    old = [DiskStore(tmp_path / f"replica-{r}", 2**20) for r in (0, 1)]  # two old replicas
    rank, added = _claim(tmp_path, 2, 3)
    assert rank == 2
    threading.Timer(0.5, old[1].close).start()  # old replica 1 persists its tiers and stops
    rank, replacing = _claim(tmp_path, 3, 3, wait_s=10)
    assert rank == 1
    old[0].close()
    rank, last = _claim(tmp_path, 1, 3)  # Serve reuses the freed rank 1, whose folder is taken
    assert rank == 0
    assert sorted(claim.rank for claim in (added, replacing, last)) == [0, 1, 2]
    assert not (tmp_path / "replica-3").exists()


def test_without_a_free_folder_below_the_count_a_replica_takes_the_next_number_after_waiting(tmp_path):
    held = [DiskStore(tmp_path / f"replica-{r}", 2**20) for r in (0, 1)]
    try:
        assert _claim(tmp_path, 1, 2, wait_s=0.3)[0] == 2
    finally:
        for store in held:
            store.close()


def test_two_replicas_starting_together_never_take_one_folder(tmp_path):
    """The claim lock is taken before the folder is checked: of 8 claims at once for the same
    two folders, each folder goes to one."""
    results, barrier = [], threading.Barrier(8)

    def start(serve_rank: int) -> None:
        barrier.wait()
        results.append(claim_state_folder(tmp_path, serve_rank, 2, wait_s=0.2))

    threads = [threading.Thread(target=start, args=(i % 2,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claim.rank for claim in results) == list(range(8))


def test_a_replica_waits_for_its_own_folder_while_another_process_still_holds_it(tmp_path):
    """A stopping replica persists its tiers, or a live one takes the folder in: a replica
    restarted under that rank waits for the folder instead of taking another one (folder 0 was
    never used on this node: its replica runs on another)."""
    held = DiskStore(tmp_path / "replica-1", 2**20)
    threading.Timer(0.5, held.close).start()
    assert _claim(tmp_path, 1, 2, wait_s=10)[0] == 1
    assert not (tmp_path / "replica-0").exists()


def test_past_the_count_a_replica_waits_for_a_folder_of_this_node_not_another_nodes_number(tmp_path):
    """Rank 3 of 3 in a rolling update: folder 0 is this node's (its old replica is stopping),
    ranks 1 and 2 run on another node and have no folder here. It waits for 0."""
    stopping = DiskStore(tmp_path / "replica-0", 2**20)
    threading.Timer(0.5, stopping.close).start()
    assert _claim(tmp_path, 3, 3, wait_s=10)[0] == 0
