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
from bundler.errors import ConfigError, NotFoundError, StoreError
from bundler.remote import gc, layout, transfer
from bundler.remote import refs as refs_module
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


def test_keep_last_is_a_floor_under_older_than():
    """`--keep-last 5 --older-than 30d` on a prefix idle for 40 days keeps its 5 newest refs (the one
    its jobs read among them); before, older-than deleted them all."""
    refs = [ref(f"llama/{i}", d(i), ago(days=40 + i)) for i in range(7)] + [ref("fresh/a", d(20), ago(days=1))]
    plan = gc.plan(refs, [], gc.Policy(keep_last=5, older_than=30 * 86400), NOW)
    assert sorted(r.name for r, _ in plan.delete_refs) == ["llama/5", "llama/6"]
    assert {r.name for r in plan.keep_refs} == {f"llama/{i}" for i in range(5)} | {"fresh/a"}
    alone = gc.plan(refs, [], gc.Policy(older_than=30 * 86400), NOW)  # without a floor, age alone decides
    assert [r.name for r in alone.keep_refs] == ["fresh/a"]


def test_keep_last_floor_through_the_cli(local_store_url):
    with open_store(local_store_url, Settings()) as store:
        for i in range(3):
            push(store, f"llama/{i}", f"v{i}".encode())
            backdate(store, layout.ref_key(f"llama/{i}"), 40 * 86400 - i * 60)
    out = bundler("gc", "--remote", local_store_url, "--keep-last", "2", "--older-than", "30d", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["executed"]["deleted_refs"] == ["llama/0"]
    with open_store(local_store_url, Settings()) as store:
        assert sorted(name for name, _ in transfer.list_remote(store).refs) == ["llama/1", "llama/2"]
    assert "whatever their age" in bundler("gc", "--help").stdout


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
                           grace=rng.choice([601, 3600, 86400]))
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


def backdate(store, key: str, seconds: float) -> None:
    """Make a folder store's object look ``seconds`` old (S3 servers date objects themselves)."""
    when = time.time() - seconds
    os.utime(store.root / key, (when, when))


def test_dry_run_deletes_nothing_and_yes_deletes_the_plan(local_store_url, tmp_path):
    """Through the CLI, on a folder store: the only store whose objects a test can age past the grace."""
    store_url = local_store_url
    with open_store(store_url, Settings()) as store:
        old = push(store, "ci/main", b"old").digest
        new = push(store, "ci/main", b"new").digest  # the ref moved: old is unreferenced
        assert stored_bundles(store) == {old, new}
    kept = bundler("gc", "--remote", store_url, "--yes")  # default grace: both are minutes old
    assert kept.returncode == 0 and "0 refs and 0 bundles" in kept.stdout
    with open_store(store_url, Settings()) as store:
        for digest in (old, new):
            backdate(store, layout.bundle_key(digest), 2 * 3600)
    dry = bundler("gc", "--remote", store_url, "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert [b["digest"] for b in plan["plan"]["delete_bundles"]] == [old] and plan["executed"] is None
    assert plan["stale_uploads"] is None  # a folder has no multipart uploads
    text = bundler("gc", "--remote", store_url).stdout
    assert f"would delete bundle {old}" in text and "--yes" in text
    with open_store(store_url, Settings()) as store:
        assert stored_bundles(store) == {old, new}  # the dry run touched nothing
    done = bundler("gc", "--remote", store_url, "--yes")
    assert done.returncode == 0, done.stderr
    with open_store(store_url, Settings()) as store:
        assert stored_bundles(store) == {new}
        assert transfer.pull(store, tmp_path / "out", ref="ci/main", settings=Settings()).digest == new


def test_plan_and_execute_on_s3(s3_server, tmp_path):
    """The same on moto over HTTP, an hour and more later by gc's clock (the server dates objects)."""
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    with open_store(s3_server, Settings()) as store:
        old = push(store, "ci/main", b"old").digest
        new = push(store, "ci/main", b"new").digest
        refs, bundles = gc.gather(store)
        the_plan = gc.plan(refs, bundles, gc.Policy(), later)
        assert [b.digest for b in the_plan.delete_bundles] == [old]
        assert gc.execute(store, the_plan, clock=lambda: later).deleted_bundles == (old,)
        assert stored_bundles(store) == {new}
        assert transfer.pull(store, tmp_path / "out", ref="ci/main", settings=Settings()).digest == new


def test_keep_last_and_rm_through_the_cli(cli_store_url):
    store_url = cli_store_url
    with open_store(store_url, Settings()) as store:
        for i in range(3):
            push(store, f"llama/{i}", f"v{i}".encode())
            time.sleep(1.1)  # listings date objects to the second
    out = bundler("gc", "--remote", store_url, "--keep-last", "1", "--yes", "--json")
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
        plan = gc.plan(refs, bundles, gc.Policy(), dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2))
        assert [b.digest for b in plan.delete_bundles] == [old]
        push(store, "b", b"old")  # a ref moves onto the planned bundle before execute
        outcome = gc.execute(store, plan, clock=lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2))
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
        plan = gc.plan(refs, bundles, gc.Policy(), later)
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


# --- the grace period and the push refresh window --------------------------------------------------


def test_a_grace_within_the_push_refresh_window_is_refused(local_store_url):
    """A push that finds its bundle stored and younger than ``transfer.REFRESH_AFTER_S`` does not
    rewrite it, so a shorter grace would let gc delete a bundle a ref was just pointed at."""
    for grace in (0, 300, transfer.REFRESH_AFTER_S):
        with pytest.raises(ConfigError, match="too short.*does not rewrite it"):
            gc.Policy(grace=grace)
    assert gc.Policy(grace=transfer.REFRESH_AFTER_S + 1).grace == transfer.REFRESH_AFTER_S + 1
    refused = bundler("gc", "--remote", local_store_url, "--grace", "5m", "--yes")
    assert refused.returncode == 2 and "--grace" in refused.stderr and "10.0m" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_refs_are_read_again_during_a_long_delete_loop(local_store_url, monkeypatch):
    """A ref written while gc works through its delete list keeps its bundle, even one gc planned to
    delete and whose date did not change (a ref linking an existing bundle)."""
    monkeypatch.setattr(gc, "REREAD_EVERY", 1)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    settings = Settings()
    with open_store(local_store_url, settings) as store:
        digests = [transfer.push(store, {"k": f"{i}".encode()}, settings=settings).digest for i in range(3)]
        refs, bundles = gc.gather(store)
        the_plan = gc.plan(refs, bundles, gc.Policy(), later)
        assert sorted(b.digest for b in the_plan.delete_bundles) == sorted(digests)
        last = the_plan.delete_bundles[-1].digest
        first_key = layout.bundle_key(the_plan.delete_bundles[0].digest)

        class RefWrittenMidLoop(type(store)):
            def delete(self, key: str) -> None:
                super().delete(key)
                if key == first_key:  # a CI job points a ref at a bundle further down the list
                    refs_module.write_ref(store, "linked", last, 1, settings=settings)

        outcome = gc.execute(RefWrittenMidLoop(store.root), the_plan, clock=lambda: later)
        assert (last, "a ref names it now") in outcome.spared
        assert last not in outcome.deleted_bundles and last in stored_bundles(store)


# --- odd objects under v1/refs/ --------------------------------------------------------------------


def test_odd_refs_are_reported_and_left_alone_and_gc_goes_on(store_url, caplog):
    """A name no ref may have, an object over the size limit, or one that is no ref document: gc
    warns naming the key, lists it in the plan with what to do, keeps the bundle it names, deletes
    nothing of it, and still collects everything else."""
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    settings = Settings()
    with open_store(store_url, settings) as store:
        kept = push(store, "keep", b"keep").digest
        copied = transfer.push(store, {"k": b"copied"}, settings=settings).digest
        doomed = transfer.push(store, {"k": b"nobody"}, settings=settings).digest
        store.write_bytes("v1/refs/copy of keep.json", json.dumps({"digest": copied}).encode())
        store.write_bytes("v1/refs/big.json", b" " * (2 << 20))
        store.write_bytes("v1/refs/broken.json", b"{not json")
        with caplog.at_level("WARNING", logger="bundler.remote.gc"):
            refs, bundles = gc.gather(store)
        the_plan = gc.plan(refs, bundles, gc.Policy(older_than=3600), later)
        odd = {r.key: r.problem for r in the_plan.odd_refs}
        assert sorted(odd) == ["v1/refs/big.json", "v1/refs/broken.json", "v1/refs/copy of keep.json"]
        assert "not a valid ref name" in odd["v1/refs/copy of keep.json"] and "delete it" in odd["v1/refs/big.json"]
        assert "push again" in odd["v1/refs/broken.json"]
        assert all(key in caplog.text for key in odd)
        assert sorted(b.digest for b in the_plan.delete_bundles) == sorted([kept, doomed])
        assert [entry["key"] for entry in the_plan.to_json()["odd_refs"]] == sorted(odd)
        outcome = gc.execute(store, the_plan, clock=lambda: later)
        assert outcome.deleted_refs == ("keep",)  # not written for an hour, by gc's clock
        assert stored_bundles(store) == {copied}  # named by the odd ref, so kept
        assert all(store.exists(key) for key in odd)


def test_odd_refs_do_not_fail_the_command(local_store_url):
    """The reviewer's case: `bundler gc` failed every time on one manual copy of a ref."""
    with open_store(local_store_url, Settings()) as store:
        push(store, "keep", b"x")
        store.write_bytes("v1/refs/copy of keep.json", store.read_bytes(layout.ref_key("keep")))
        store.write_bytes("v1/refs/big.json", b" " * (2 << 20))
    out = bundler("gc", "--remote", local_store_url, "--older-than", "30d", "--yes")
    assert out.returncode == 0, out.stderr
    assert "odd ref v1/refs/copy of keep.json" in out.stdout and "odd ref v1/refs/big.json" in out.stdout
    assert "2 odd refs left alone" in out.stdout and "v1/refs/big.json" in out.stderr


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (403, "AccessDenied")])
def test_a_ref_the_store_fails_to_read_stops_gc_before_any_delete(s3_bucket, moto_endpoint, status, code):
    """Unreachable, or denied (403; which without s3:ListBucket would read as "missing", but gc has
    just listed the ref): gc must not delete on what it could not read."""
    from fault_proxy import Fault, FaultProxy

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    proxy = FaultProxy(moto_endpoint)
    try:
        url = f"s3://{s3_bucket}/p?endpoint={proxy.url}&addressing=path"
        settings = Settings(max_attempts=2)
        with open_store(url, settings) as store:
            push(store, "a", b"a")
            unreferenced = transfer.push(store, {"k": b"nobody"}, settings=settings).digest
            refs, bundles = gc.gather(store)
            the_plan = gc.plan(refs, bundles, gc.Policy(), later)
            assert [b.digest for b in the_plan.delete_bundles] == [unreferenced]
            proxy.add(Fault(when=lambda seen: seen.method == "GET" and "/v1/refs/a.json" in seen.path,
                            times=None, status=status, code=code))
            with pytest.raises(StoreError) as err:
                gc.gather(store)
            assert not isinstance(err.value, NotFoundError) and "v1/refs/a.json" in str(err.value)
            with pytest.raises(StoreError):
                gc.execute(store, the_plan, clock=lambda: later)
            assert unreferenced in stored_bundles(store)
    finally:
        proxy.close()


# --- multipart uploads that killed pushes left behind ----------------------------------------------


def test_gc_aborts_stale_multipart_uploads_and_the_dry_run_only_lists_them(s3_server, s3_bucket, moto_endpoint,
                                                                          boto_client, local_store_url):
    """moto dates every multipart upload 2010-11-10, so an upload started here reads as long stale."""
    client = boto_client(moto_endpoint)
    key = f"some/prefix/v1/bundles/{'a' * 64}.tar.zst"
    client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/not-ours")  # outside the store's prefix
    dry = bundler("gc", "--remote", s3_server, "--json")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)["stale_uploads"]
    assert listed == {"older_than_s": 3600.0, "keys": [f"v1/bundles/{'a' * 64}.tar.zst"], "aborted": False,
                      "error": None}
    assert len(client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 2  # a dry run aborts nothing
    text = bundler("gc", "--remote", s3_server, "--grace", "2h")
    assert "would abort multipart upload of v1/bundles/" in text.stdout
    assert "1 multipart uploads older than 2h to abort" in text.stdout
    done = bundler("gc", "--remote", s3_server, "--yes")
    assert done.returncode == 0, done.stderr
    assert "1 multipart uploads older than 1h aborted" in done.stdout
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]] == ["elsewhere/not-ours"]
    with open_store(local_store_url, Settings()) as store:
        push(store, "a", b"a")
    local = bundler("gc", "--remote", local_store_url)
    assert "no multipart uploads to check in a folder store" in local.stdout
