"""AutotuneCache: local and remote records, keys, matching, failure policy, pickling."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import pickle
import threading
from pathlib import Path

import pytest
import triton

from bundler import autotune, keys
from bundler.autotune import AutotuneCache, configs_hash
from bundler.config import Settings
from bundler.errors import AccessDeniedError, StoreUnreachableError
from bundler.remote import health as shared
from bundler.remote import layout
from bundler.stores import open_store

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (32, 8))]
META = {"kernel": "tests.add", "tuning_key": [100, "torch.float32"]}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", triton_cache_dir=tmp_path / "triton", remote=None)


def make(settings: Settings, configs: list = CONFIGS, meta: dict = META, filename: str = "/src/kernels.py"):
    cache = AutotuneCache.create(meta, filename, configs_hash(configs), settings=settings)
    assert cache is not None
    return cache


def test_saved_winner_comes_back_as_the_same_candidate(settings: Settings) -> None:
    make(settings).save(CONFIGS[2], time_taken_ns=5_000_000)
    assert make(settings).read_best(CONFIGS) is CONFIGS[2]
    record = json.loads(make(settings).local_path.read_text())
    assert record["kwargs"] == {"BLOCK": 32}
    assert record["fields"]["num_warps"] == 8 and record["fields"]["num_stages"] == 3
    assert record["time_taken_ns"] == 5_000_000
    assert [p.name for p in make(settings).local_path.parent.iterdir()] == [make(settings).local_path.name]


def test_nothing_stored_is_a_miss(settings: Settings) -> None:
    assert make(settings).read_best(CONFIGS) is None


def test_changed_candidate_list_is_a_reported_miss(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    make(settings).save(CONFIGS[0], 1)
    wider = [*CONFIGS, triton.Config({"BLOCK": 64})]
    cache = make(settings, configs=wider)
    assert cache.local_path == make(settings).local_path  # same record, checked inside
    with caplog.at_level(logging.INFO, logger="bundler.autotune"):
        assert cache.read_best(wider) is None
    assert "candidate configs changed" in caplog.text


def test_record_matching_several_candidates_is_a_miss(settings: Settings) -> None:
    twins = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 16})]
    make(settings, configs=twins).save(twins[0], 1)
    assert make(settings, configs=twins).read_best(twins) is None


def test_coordinate_descent_result_is_rebuilt_and_marked(settings: Settings) -> None:
    found = triton.Config({"BLOCK": 48}, num_warps=2, num_stages=4)
    make(settings).save(found, 1, found_by_coordesc=True)
    best = make(settings).read_best(CONFIGS)
    assert best not in CONFIGS
    assert best.kwargs == {"BLOCK": 48} and best.num_warps == 2 and best.num_stages == 4
    assert best.found_by_coordesc is True


def _hook(nargs: dict) -> None:
    pass


def _stored_then_changed(settings: Settings, configs: list, change: dict, coordesc: bool = True) -> AutotuneCache:
    """A cache whose local record was saved for ``configs`` and then edited by ``change``."""
    cache = make(settings, configs=configs)
    cache.save(triton.Config({"BLOCK": 48}, num_warps=2) if coordesc else configs[1], 1, found_by_coordesc=coordesc)
    record = json.loads(cache.local_path.read_text())
    for name, value in change.items():
        record[name] = {**record[name], **value} if isinstance(value, dict) else value
    cache.local_path.write_text(json.dumps(record))
    return make(settings, configs=configs)


@pytest.mark.parametrize(
    "change",
    [{"fields": {"pre_hook": "evil"}}, {"fields": {"num_warps": "lots"}}, {"fields": {"num_warps": True}},
     {"fields": {"ir_override": "/etc/passwd"}}, {"fields": {"num_buffers_warp_spec": 3}},
     {"fields": {"maxnreg": 64}}, {"kwargs": {"BLOCK": 48, "EXTRA": 1}}, {"kwargs": {"OTHER": 48}},
     {"kwargs": {"BLOCK": {"evil": 1}}}, {"kwargs": {"BLOCK": [1, 2]}}],
    ids=["pre_hook", "num_warps-str", "num_warps-bool", "ir_override", "unknown-option", "option-none-in-all",
         "extra-kwarg", "other-kwarg", "kwarg-dict", "kwarg-list"],
)
@pytest.mark.parametrize("coordesc", [True, False], ids=["coordesc", "candidate"])
def test_a_record_with_options_the_candidates_cannot_have_is_a_miss(
        settings: Settings, caplog: pytest.LogCaptureFixture, change: dict, coordesc: bool) -> None:
    cache = _stored_then_changed(settings, CONFIGS, change, coordesc)
    with caplog.at_level(logging.DEBUG, logger="bundler.autotune"):
        assert cache.read_best(CONFIGS) is None
    assert "does not fit the candidates" in caplog.text


def test_a_rebuilt_config_keeps_the_candidates_pre_hook(settings: Settings) -> None:
    hooked = [triton.Config({"BLOCK": b}, num_warps=4, pre_hook=_hook) for b in (16, 32)]
    best = _stored_then_changed(settings, hooked, {}).read_best(hooked)
    assert best.kwargs == {"BLOCK": 48} and best.num_warps == 2 and best.pre_hook is _hook
    assert best.ir_override is None and best.found_by_coordesc is True


def test_candidates_that_differ_in_pre_hook_rebuild_nothing(settings: Settings) -> None:
    mixed = [triton.Config({"BLOCK": 16}, pre_hook=_hook), triton.Config({"BLOCK": 32})]
    assert _stored_then_changed(settings, mixed, {}).read_best(mixed) is None


def test_an_oversized_remote_record_is_a_miss_read_no_further(tmp_path: Path, monkeypatch, caplog,  # noqa: ANN001
                                                              fresh_breakers) -> None:
    settings = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri(), local_cache=False,
                        bundles=False)
    key = layout.autotune_key(make(settings).key)
    read: list[int] = []

    class _Huge(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # noqa: ANN001
            read.append(len(buffer))
            buffer[:] = b" " * len(buffer)  # an endless record (JSON whitespace)
            return len(buffer)

    class _HugeStore:
        def open_read(self, name: str) -> io.RawIOBase:
            assert name == key
            return _Huge()

    monkeypatch.setattr(shared, "shared_store", lambda s: _HugeStore())
    with caplog.at_level(logging.WARNING):
        assert make(settings).read_best(CONFIGS) is None
    assert sum(read) <= autotune.RECORD_LIMIT + 1
    assert "over" in caplog.text and shared.remote_usable(settings, "read")  # a miss, not a dead store


def test_a_remote_record_at_the_limit_is_read(tmp_path: Path, fresh_breakers) -> None:  # noqa: ANN001
    settings = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri(), local_cache=False,
                        bundles=False)
    make(settings).save(CONFIGS[1], 1)
    store = open_store(settings.remote)
    key = layout.autotune_key(make(settings).key)
    data = store.read_bytes(key)
    store.write_bytes(key, data + b" " * (autotune.RECORD_LIMIT - len(data)))
    assert make(settings).read_best(CONFIGS) is CONFIGS[1]


def test_kwarg_named_like_a_launch_option_is_not_confused(settings: Settings) -> None:
    configs = [triton.Config({"num_warps": 1}, num_warps=4), triton.Config({"num_warps": 4}, num_warps=1)]
    make(settings, configs=configs).save(configs[1], 1)
    assert make(settings, configs=configs).read_best(configs) is configs[1]


@pytest.mark.parametrize(
    "change",
    [
        lambda s, m, f: (s.replace(tag="other"), m, f),
        lambda s, m, f: (s, {**m, "tuning_key": [200, "torch.float32"]}, f),
        lambda s, m, f: (s, m, "/src/other_kernels.py"),
    ],
    ids=["tag", "tuning-key", "file"],
)
def test_key_changes_with_tag_meta_and_file(settings: Settings, change) -> None:  # noqa: ANN001
    make(settings).save(CONFIGS[0], 1)
    s, m, f = change(settings, META, "/src/kernels.py")
    assert make(s, meta=m, filename=f).read_best(CONFIGS) is None


@pytest.mark.parametrize("fact", ["triton_version", "backend_hash"])
def test_key_changes_with_triton_version_and_backend(settings: Settings, monkeypatch, fact: str) -> None:  # noqa: ANN001
    make(settings).save(CONFIGS[0], 1)
    monkeypatch.setattr(keys, fact, lambda: "something-else")
    assert make(settings).read_best(CONFIGS) is None


def test_only_the_basename_of_the_file_counts(settings: Settings) -> None:
    make(settings, filename="/ci/checkout-1/kernels.py").save(CONFIGS[1], 1)
    assert make(settings, filename="/home/me/repo/kernels.py").read_best(CONFIGS) is CONFIGS[1]


def test_create_returns_none_when_no_cache_is_usable(tmp_path: Path) -> None:
    off = Settings(cache_dir=tmp_path, local_cache=False, bundles=False, remote=None)
    assert AutotuneCache.create(META, "k.py", "h", settings=off) is None
    remote_off = off.replace(remote=(tmp_path / "s").as_uri(), remote_autotune=False)
    assert AutotuneCache.create(META, "k.py", "h", settings=remote_off) is None


def test_remote_record_is_shared_and_copied_locally(tmp_path: Path) -> None:
    store_url = (tmp_path / "store").as_uri()
    producer = Settings(cache_dir=tmp_path / "a", remote=store_url)
    make(producer).save(CONFIGS[1], 7)
    assert open_store(store_url).exists(layout.autotune_key(make(producer).key))
    consumer = producer.replace(cache_dir=tmp_path / "b")
    assert make(consumer).read_best(CONFIGS) is CONFIGS[1]
    assert make(consumer).local_path.is_file()


def test_remote_only_cache_works_without_local_files(tmp_path: Path) -> None:
    remote_only = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri(), local_cache=False,
                           bundles=False)
    make(remote_only).save(CONFIGS[0], 1)
    assert make(remote_only).read_best(CONFIGS) is CONFIGS[0]
    assert not (tmp_path / "c").exists()


class _DeadStore:
    calls = 0

    def _fail(self, *args: object, **kwargs: object) -> None:
        type(self).calls += 1
        raise StoreUnreachableError("connection refused")

    open_read = read_bytes = write_bytes = _fail


@pytest.fixture
def fresh_breakers():  # noqa: ANN201
    shared.reset()
    yield
    shared.reset()


def test_store_failure_is_one_warning_and_a_miss(tmp_path: Path, monkeypatch, caplog, fresh_breakers) -> None:  # noqa: ANN001
    """An unreachable store fails one read; the failure stops reads and writes for the process."""
    monkeypatch.setattr(shared, "shared_store", lambda settings: _DeadStore())
    calls = _DeadStore.calls
    settings = Settings(cache_dir=tmp_path, remote="s3://dead/prefix")
    with caplog.at_level(logging.WARNING):
        assert make(settings).read_best(CONFIGS) is None
        make(settings).save(CONFIGS[0], 1)  # must not raise; the local side still works
        make(settings).save(CONFIGS[0], 1)
        other = make(settings, meta={"kernel": "other"})
        assert other.read_best(CONFIGS) is None
    assert _DeadStore.calls == calls + 1  # the first read; everything after skipped the dead store
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert make(settings).read_best(CONFIGS) is CONFIGS[0]


class _ReadOnlyStore:
    """A bucket this node may read but not write, holding one kernel's record."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.records, self.reads = records, 0

    def open_read(self, key: str) -> io.BytesIO:
        self.reads += 1
        return io.BytesIO(self.records[key])

    def read_bytes(self, key: str, limit: int = 1 << 20) -> bytes:
        return self.open_read(key).read()

    def write_bytes(self, key: str, data: bytes) -> None:
        raise AccessDeniedError(f"AccessDenied on PutObject {key}")


def test_a_denied_write_does_not_turn_remote_reads_off(tmp_path: Path, monkeypatch, fresh_breakers) -> None:  # noqa: ANN001
    producer = Settings(cache_dir=tmp_path / "ci", remote=(tmp_path / "s").as_uri())
    make(producer, meta={"kernel": "prebaked"}).save(CONFIGS[1], 1)
    prebaked = layout.autotune_key(make(producer, meta={"kernel": "prebaked"}).key)
    store = _ReadOnlyStore({prebaked: open_store(producer.remote).read_bytes(prebaked)})
    monkeypatch.setattr(shared, "shared_store", lambda settings: store)
    node = producer.replace(cache_dir=tmp_path / "node")
    make(node, meta={"kernel": "fresh"}).save(CONFIGS[0], 1)  # denied: trips the write breaker only
    assert make(node, meta={"kernel": "prebaked"}).read_best(CONFIGS) is CONFIGS[1]
    assert store.reads == 1


def test_a_tripped_read_breaker_retries_after_five_minutes(tmp_path: Path, monkeypatch, fresh_breakers) -> None:  # noqa: ANN001
    now = [1000.0]
    monkeypatch.setattr(shared, "_clock", lambda: now[0])
    monkeypatch.setattr(shared, "shared_store", lambda settings: _DeadStore())
    settings = Settings(cache_dir=tmp_path, remote="s3://flaky/prefix")
    calls = _DeadStore.calls
    make(settings).read_best(CONFIGS)
    now[0] += 299
    make(settings).read_best(CONFIGS)
    assert _DeadStore.calls == calls + 1
    now[0] += 2
    make(settings).read_best(CONFIGS)
    assert _DeadStore.calls == calls + 2


def _signed_pair(tmp_path: Path, key: str | None) -> tuple[Settings, Settings]:
    producer = Settings(cache_dir=tmp_path / "ci", remote=(tmp_path / "s").as_uri(), signing_key=key)
    return producer, producer.replace(cache_dir=tmp_path / "node", signing_key="secret")


def test_signed_remote_record_is_accepted(tmp_path: Path, fresh_breakers) -> None:  # noqa: ANN001
    producer, node = _signed_pair(tmp_path, "secret")
    make(producer).save(CONFIGS[1], 1)
    stored = json.loads(open_store(producer.remote).read_bytes(layout.autotune_key(make(producer).key)))
    assert stored["signature"].startswith("hmac-sha256:")
    assert make(node).read_best(CONFIGS) is CONFIGS[1]


@pytest.mark.parametrize("producer_key", [None, "another-secret"], ids=["unsigned", "other-key"])
def test_unsigned_or_wrongly_signed_remote_record_is_one_warning_and_a_miss(
        tmp_path: Path, caplog, fresh_breakers, producer_key: str | None) -> None:  # noqa: ANN001
    producer, node = _signed_pair(tmp_path, producer_key)
    make(producer).save(CONFIGS[1], 1)
    make(producer, meta={"kernel": "other"}).save(CONFIGS[1], 1)
    with caplog.at_level(logging.WARNING):
        assert make(node).read_best(CONFIGS) is None
        assert make(node, meta={"kernel": "other"}).read_best(CONFIGS) is None
    assert not make(node).local_path.exists()  # not copied into the local cache either
    assert len([r for r in caplog.records if "signed" in r.getMessage()]) <= 1


def test_a_signed_record_copied_to_another_kernel_is_rejected(tmp_path: Path, fresh_breakers) -> None:  # noqa: ANN001
    producer, node = _signed_pair(tmp_path, "secret")
    make(producer).save(CONFIGS[1], 1)
    store = open_store(producer.remote)
    victim = make(node, meta={"kernel": "victim"})
    store.write_bytes(layout.autotune_key(victim.key), store.read_bytes(layout.autotune_key(make(producer).key)))
    assert victim.read_best(CONFIGS) is None


class _StrictConfig(triton.Config):
    """A config type that validates its options, as a future Triton might."""

    def __init__(self, kwargs: dict, num_warps: int = 4, **rest: object) -> None:
        if not isinstance(num_warps, int):
            raise TypeError(f"num_warps must be an int, not {num_warps!r}")
        super().__init__(kwargs, num_warps=num_warps, **rest)


@pytest.mark.parametrize(
    "change",
    [{"fields": []}, {"time_taken_ns": "x"}, {"found_by_coordesc": "yes"},
     {"kwargs": {"BLOCK": 48}, "found_by_coordesc": True, "fields": {"num_warps": "x"}}],
    ids=["fields-list", "time-str", "coordesc-str", "unbuildable"],
)
def test_well_formed_json_with_wrong_types_is_a_miss(settings: Settings, change: dict) -> None:
    configs = [_StrictConfig({"BLOCK": b}) for b in (16, 32)]
    cache = make(settings, configs=configs)
    cache.save(configs[0], 1)
    record = json.loads(cache.local_path.read_text())
    cache.local_path.write_text(json.dumps({**record, **change}))
    assert make(settings, configs=configs).read_best(configs) is None


def test_corrupt_local_record_is_a_miss(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    cache = make(settings)
    cache.local_path.parent.mkdir(parents=True)
    cache.local_path.write_text("{not json")
    assert cache.read_best(CONFIGS) is None
    assert "unreadable" in caplog.text


def test_stats_count_hits_misses_and_time_saved(settings: Settings) -> None:
    before = autotune.stats()
    make(settings).read_best(CONFIGS)
    make(settings).save(CONFIGS[0], 3_000)
    make(settings).read_best(CONFIGS)
    after = autotune.stats()
    assert (after.misses - before.misses, after.hits - before.hits, after.saves - before.saves) == (1, 1, 1)
    assert after.time_saved_ns - before.time_saved_ns == 3_000


def _create_in_worker(settings: Settings) -> AutotuneCache:
    return AutotuneCache.create(META, "/worker/kernels.py", configs_hash(CONFIGS), settings=settings)


def _read_in_worker(cache: AutotuneCache) -> tuple[dict | None, str]:
    best = cache.read_best(CONFIGS)
    return (best.kwargs if best is not None else None), cache._read_remote().decode()


def test_cache_made_in_a_worker_process_saves_in_the_parent(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        cache = pool.apply(_create_in_worker, (settings,))
    cache.save(CONFIGS[2], 1)
    assert make(settings, filename="kernels.py").read_best(CONFIGS) is CONFIGS[2]
    assert open_store(settings.remote).exists(layout.autotune_key(cache.key))
    assert pickle.loads(pickle.dumps(cache)).key == cache.key


class _ProcessBoundStore:
    """A store handle as a real client is one: it works here, it does not pickle (it holds a lock)."""

    def __init__(self, inner: object) -> None:
        self._inner, self._lock = inner, threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["_inner"], name)


def test_cache_that_used_its_store_pickles_into_a_worker(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # Compile workers pickle caches to their parent: one that kept a store handle after using it
    # would fail to pickle, or share a connection pool across processes. It must travel as plain
    # data and open the store again in the worker (where shared_store is not patched).
    settings = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri(), local_cache=False,
                        bundles=False)
    real = shared.shared_store
    monkeypatch.setattr(shared, "shared_store", lambda s: _ProcessBoundStore(real(s)))
    cache = make(settings)
    cache.save(CONFIGS[1], 1)
    assert cache._read_remote() is not None  # the remote store has been opened and used
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        best, record = pool.apply(_read_in_worker, (cache,))
    assert best == CONFIGS[1].kwargs
    assert json.loads(record)["kwargs"] == CONFIGS[1].kwargs
