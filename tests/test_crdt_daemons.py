"""CRDT durability and trust with real daemon processes: SIGKILL during writes, a rogue peer."""

from __future__ import annotations

from crdt_scenarios import rogue_attack, sigkill_during_writes


def test_sigkill_during_1000_writes_keeps_every_acknowledged_write(tmp_path):
    result = sigkill_during_writes(tmp_path, writes=1000, writers=4, kill_after=300)
    assert result["acked"] >= 300
    assert result["lost_acked"] == 0 and result["wrong_values"] == 0, result
    assert result["prefixes"], result  # per writer: nothing reordered or half-applied
    assert 0 <= result["in_flight_kept"] <= 4  # at most the writes in flight at the kill
    assert result["present"] < 1000  # it really was killed mid-way
    assert result["write_after_restart"], result


def test_a_rogue_peer_changes_nothing_and_replication_keeps_working(tmp_path):
    r = rogue_attack(tmp_path, rounds=3, honest_writes=150)
    assert r["rogue_exit"] == [0, 0], r["logs"]
    sent = r["sent"][0]
    kinds = ("forged", "unauthorized", "oversized", "garbage", "wrong_doc", "malformed", "replayed")
    for kind in (*kinds, "gossip_forged", "gossip_garbage"):
        assert sent.get(kind, 0) > 0, sent
    assert sent["identities"] > 1  # the peer limits banned it; it came back as another peer
    assert r["bans_b"]["bans_total"] > 0 and "malformed" in " ".join(r["bans_b"]["ban_reasons"].values())
    assert r["owned_b"] == r["owned_a"] == r["expected_owned"]  # nothing of the rogue's got in
    assert r["public_b"] == r["public_a"] == {"hello": "world", "from-b": 1}
    for status in (r["status_b"], r["status_a"]):
        owned, public = status["docs"]["owned"], status["docs"]["public"]
        assert owned["rejected_signature"] > 0 and owned["rejected_access"] > 0, owned
        assert owned["rejected_doc"] > 0 and owned["duplicates"] > 0, owned
        assert public["rejected_malformed"] > 0, public
        assert status["rejected"] > 0 and status["bad_frames"] > 0, status
        assert status["gossip"]["bad_rpcs"] > 0 and status["gossip"]["rejected"] > 0, status["gossip"]
        assert set(public["version"]) <= set(r["honest"])  # no rogue author anywhere
    version_b = r["status_b"]["docs"]["owned"]["version"]
    assert len(version_b) == 1 and list(version_b.values()) == [151]
