"""`bundler gc`: retention per prefix, the grace period, the dry run, and gc racing pushes.

The promise users rely on: gc never deletes a bundle a ref names, nor one young enough that a
push may still be on its way to writing the ref, and a push that runs while gc deletes loses
nothing (its ref never ends up naming a missing bundle).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from bundler.config import Settings
from bundler.errors import ConfigError
from bundler.remote import gc, layout, transfer
from bundler.stores import open_store

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def ago(**kw: float) -> dt.datetime:
    return NOW - dt.timedelta(**kw)


def d(n: int) -> str:
    return f"{n:064x}"


def ref(name: str, digest: str, when: dt.datetime) -> gc.RefEntry:
    return gc.RefEntry(name, digest, when)


def bundle(digest: str, when: dt.datetime, size: int = 100) -> gc.BundleEntry:
    return gc.BundleEntry(digest, size, when)


# --- the plan (pure) -----------------------------------------------------------------------------


def test_keep_last_is_per_prefix():
    refs = [ref(f"llama/{i}", d(i), ago(days=i)) for i in range(1, 5)] + [
        ref(f"mistral/{i}", d(10 + i), ago(days=i)) for i in range(1, 3)]
    plan = gc.plan(refs, [], gc.Policy(keep_last=2), NOW)
    assert sorted(r.name for r, _ in plan.delete_refs) == ["llama/3", "llama/4"]
    assert {r.name for r in plan.keep_refs} == {"llama/1", "llama/2", "mistral/1", "mistral/2"}


def test_older_than_deletes_old_refs_and_then_their_bundles():
    refs = [ref("a", d(1), ago(days=40)), ref("b", d(2), ago(days=1))]
    bundles = [bundle(d(1), ago(days=40)), bundle(d(2), ago(days=1))]
    plan = gc.plan(refs, bundles, gc.Policy(older_than=30 * 86400), NOW)
    assert [r.name for r, _ in plan.delete_refs] == ["a"]
    assert [b.digest for b in plan.delete_bundles] == [d(1)] and plan.freed_bytes == 100


def test_unreferenced_bundles_wait_out_the_grace_period():
    bundles = [bundle(d(1), ago(minutes=59)), bundle(d(2), ago(minutes=61)), bundle(d(3), None)]
    plan = gc.plan([], bundles, gc.Policy(), NOW)  # default grace: 1 h
    assert [b.digest for b in plan.delete_bundles] == [d(2)]
    assert {b.digest for b, _ in plan.keep_bundles} == {d(1), d(3)}


def test_no_bundle_a_remaining_ref_names_is_ever_planned_for_deletion():
    rng = random.Random(11)
    for _ in range(200):
        refs = [ref(f"p{rng.randint(0, 3)}/r{i}", d(rng.randint(0, 30)), ago(days=rng.uniform(0, 90)))
                for i in range(rng.randint(0, 20))]
        bundles = [bundle(d(i), ago(days=rng.uniform(0, 90))) for i in range(31)]
        policy = gc.Policy(keep_last=rng.choice([None, 1, 2, 5]), older_than=rng.choice([None, 86400, 30 * 86400]),
                           grace=rng.choice([0, 3600]))
        plan = gc.plan(refs, bundles, policy, NOW)
        named = {r.digest for r in plan.keep_refs}
        assert not named & {b.digest for b in plan.delete_bundles}
        assert all(_age(b) > policy.grace for b in plan.delete_bundles)


def _age(b: gc.BundleEntry) -> float:
    return (NOW - b.modified).total_seconds()


def test_durations_and_bad_policies():
    assert gc.parse_duration("90") == 90 and gc.parse_duration("30m") == 1800 and gc.parse_duration("7d") == 604800
    with pytest.raises(ConfigError, match="not a duration"):
        gc.parse_duration("a week")
    with pytest.raises(ConfigError, match="keep at least 1"):
        gc.Policy(keep_last=0)


# --- against real stores -------------------------------------------------------------------------


@pytest.fixture(params=["local_store_url", "s3_server"])
def cli_store_url(request: pytest.FixtureRequest) -> str:
    """Stores a `bundler` process can reach: a folder, and moto over HTTP on 127.0.0.1."""
    return request.getfixturevalue(request.param)


def bundler(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bundler", *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())


def push(store, name: str, payload: bytes) -> transfer.PushResult:
    return transfer.push(store, {"autotune/x.json": payload}, ref=name, settings=Settings())


def stored_bundles(store) -> set[str]:
    return {layout.digest_from_bundle_key(i.key) for i in store.list(layout.BUNDLES)}


def test_dry_run_deletes_nothing_and_yes_deletes_the_plan(cli_store_url, tmp_path):
    store_url = cli_store_url
    with open_store(store_url, Settings()) as store:
        old = push(store, "ci/main", b"old").digest
        new = push(store, "ci/main", b"new").digest  # the ref moved: old is unreferenced
        assert stored_bundles(store) == {old, new}
    dry = bundler("gc", "--remote", store_url, "--grace", "0s", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert [b["digest"] for b in plan["plan"]["delete_bundles"]] == [old] and plan["executed"] is None
    text = bundler("gc", "--remote", store_url, "--grace", "0s").stdout
    assert f"would delete bundle {old}" in text and "--yes" in text
    with open_store(store_url, Settings()) as store:
        assert stored_bundles(store) == {old, new}  # the dry run touched nothing
    kept = bundler("gc", "--remote", store_url, "--yes")  # default grace: both are minutes old
    assert kept.returncode == 0 and "0 refs and 0 bundles" in kept.stdout
    done = bundler("gc", "--remote", store_url, "--grace", "0s", "--yes")
    assert done.returncode == 0, done.stderr
    with open_store(store_url, Settings()) as store:
        assert stored_bundles(store) == {new}
        assert transfer.pull(store, tmp_path / "out", ref="ci/main", settings=Settings()).digest == new


def test_keep_last_and_rm_through_the_cli(cli_store_url):
    store_url = cli_store_url
    with open_store(store_url, Settings()) as store:
        for i in range(3):
            push(store, f"llama/{i}", f"v{i}".encode())
            time.sleep(1.1)  # listings date objects to the second
    out = bundler("gc", "--remote", store_url, "--keep-last", "1", "--grace", "0s", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)["executed"]["deleted_refs"]) == ["llama/0", "llama/1"]
    assert bundler("rm", "llama/2", "--remote", store_url).returncode == 0
    missing = bundler("rm", "llama/2", "--remote", store_url)
    assert missing.returncode == 3 and "bundler ls" in missing.stderr


def test_gc_spares_a_bundle_a_ref_moved_onto_after_the_plan(local_store_url):
    with open_store(local_store_url, Settings()) as store:
        old = push(store, "a", b"old").digest
        push(store, "a", b"new")
        refs, bundles = gc.gather(store)
        plan = gc.plan(refs, bundles, gc.Policy(grace=0), dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
        assert [b.digest for b in plan.delete_bundles] == [old]
        push(store, "b", b"old")  # a ref moves onto the planned bundle before execute
        outcome = gc.execute(store, plan, clock=lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
        assert outcome.deleted_bundles == () and (old, "a ref names it now") in outcome.spared
        assert old in stored_bundles(store)


def test_a_bundle_a_ref_needs_besides_its_own_is_kept(local_store_url):
    """A torch ref names its precompiled-header bundle in ``extra.bundles``; no ref names it as its
    own bundle, and gc must still never delete it while the ref exists."""
    with open_store(local_store_url, Settings()) as store:
        headers = transfer.push(store, {"pch/h.gch": b"header"}, settings=Settings()).digest
        main = transfer.push(store, {"inductor/x": b"x"}, ref="torch/abc", settings=Settings(),
                             ref_extra={"bundles": {"pch": {"digest": headers, "size": 1, "files": 1}}}).digest
        stray = transfer.push(store, {"pch/old.gch": b"old"}, settings=Settings()).digest
        # an offline import writes the ref from the manifest: the link is a producer fact there
        imported_headers = transfer.push(store, {"pch/i.gch": b"imported"}, settings=Settings()).digest
        imported = transfer.push(store, {"inductor/y": b"y"}, ref="torch/imported", settings=Settings(),
                                 producer={"bundle.pch": imported_headers}).digest
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
        refs, bundles = gc.gather(store)
        plan = gc.plan(refs, bundles, gc.Policy(grace=0), later)
        assert [b.digest for b in plan.delete_bundles] == [stray]
        gc.execute(store, plan, clock=lambda: later)
        assert stored_bundles(store) == {headers, main, imported_headers, imported}


def test_concurrent_pushes_during_gc_lose_nothing(tmp_path):
    """Threads push (new bundles, and bundles gc is deleting as old) while gc runs with a 1 h grace."""
    url = (tmp_path / "store").as_uri()
    root = tmp_path / "store"
    settings = Settings()
    with open_store(url, settings) as store:
        old = [push(store, f"old/{i}", f"payload {i}".encode()).digest for i in range(12)]
        for i in range(12):
            store.delete(layout.ref_key(f"old/{i}"))  # now unreferenced ...
        two_hours_ago = time.time() - 7200
        for digest in old:  # ... and past the grace period
            os.utime(root / layout.bundle_key(digest), (two_hours_ago, two_hours_ago))
    pushed: dict[str, str] = {}
    errors: list[BaseException] = []

    def pusher(worker: int) -> None:
        try:
            with open_store(url, settings) as s:
                for i in range(12):
                    payload = f"payload {i}" if (i + worker) % 2 else f"fresh {worker} {i}"  # half re-push old bytes
                    pushed[f"live/{worker}/{i}"] = push(s, f"live/{worker}/{i}", payload.encode()).digest
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def collector() -> None:
        try:
            with open_store(url, settings) as s:
                for _ in range(5):
                    refs, bundles = gc.gather(s)
                    gc.execute(s, gc.plan(refs, bundles, gc.Policy(), dt.datetime.now(dt.timezone.utc)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(4)] + [threading.Thread(target=collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open_store(url, settings) as store:
        present = stored_bundles(store)
        for name, digest in pushed.items():
            assert transfer.read_ref(store, name, settings).digest == digest
            assert digest in present, f"ref {name} names deleted bundle {digest}"
        for digest in set(old) - set(pushed.values()):
            assert digest not in present  # gc did run: what nobody re-pushed is gone
