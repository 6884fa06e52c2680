"""Why an FX graph missed inside a bundle that hit (torch_missdiff), with real torch.

- the recorder wraps ``codecache.compiled_fx_graph_hash``, keeps the components of the keys a real
  CPU compile computes, and puts the original back when it stops; another signature is left alone;
- the diff, on the components of two real compiles that differ in input shape: by component name,
  the nearest bundled graph, what differs, and the log lines and summary phrase;
- the ref field: compact, capped, read back; a malformed one explains nothing;
- the session: a bundle baked at one width, a job at another hits it and says why its graphs missed.

The compiles are matrix products only (extern kernels, no C++): a cold compile takes seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _torch_helpers import matmul  # noqa: E402

from bundler.integrations import torch as bt  # noqa: E402
from bundler.integrations import torch_lookups as tl  # noqa: E402
from bundler.integrations import torch_missdiff as md  # noqa: E402


def _train_step(width: int) -> None:
    """Forward and backward of a matrix product compiled afresh: two FX graphs."""
    torch._dynamo.reset()
    a = torch.randn(width, width, requires_grad=True)
    out = torch.compile(matmul)(a, torch.randn(width, width))
    out.sum().backward()


def _fx_keys(root: Path) -> set[str]:
    return tl.installed_keys(f"inductor/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())[tl.FX]


def _original() -> object:
    from torch._inductor import codecache

    return codecache.__dict__["compiled_fx_graph_hash"]


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[str, str]]]:
    """The components of the FX graphs of two real compiles, width 4 and width 8, each in a cache
    of its own (so the second compiles too, and no dynamic shapes are inferred from the first)."""
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        for width in (4, 8):
            mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp(f"w{width}") / "inductor"))
            with md.DetailsRecorder() as recorder:
                _train_step(width)
            out[width] = recorder.details()
    finally:
        mp.undo()
        torch._dynamo.reset()
    return out


# --- capture ----------------------------------------------------------------------------------------


def test_the_recorder_keeps_the_components_of_the_keys_a_real_compile_computes_and_restores_torch(
    inductor_dir: Path,
) -> None:
    original = _original()
    with md.DetailsRecorder() as recorder:
        assert recorder.watching and _original() is not original, "not wrapped"
        _train_step(4)
    assert _original() is original, "not restored"
    details = recorder.details()
    assert set(details) == _fx_keys(inductor_dir) and len(details) == 2, details.keys()
    for parts in details.values():
        assert {"gm", "example_inputs[0]", "fx_kwargs[is_backward]", "inductor_config[max_autotune]"} <= set(parts)
        assert all(len(name) + len(text) + 2 <= 300 for name, text in parts.items())
        assert parts["example_inputs[0]"].split("] ", 1)[1].startswith("TensorMetadata(dtype=torch.float32, shape=[4, 4]")

    torch._dynamo.reset()
    _train_step(4)  # after stop: nothing more is recorded (and a cached compile computes the keys again)
    assert recorder.details() == details


def test_another_signature_is_left_alone_and_explains_nothing(
    inductor_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import codecache

    def compiled_fx_graph_hash(graph, inputs):  # noqa: ANN001, ANN202 - not the signature we know
        raise AssertionError("never called here")

    monkeypatch.setattr(codecache, "compiled_fx_graph_hash", compiled_fx_graph_hash)
    with md.DetailsRecorder() as recorder:
        assert not recorder.watching and codecache.compiled_fx_graph_hash is compiled_fx_graph_hash
    assert recorder.details() == {}
    assert md.explain_session(recorder, [], None) == ""


def test_nested_recorders_share_the_wrapper_and_the_last_one_removes_it() -> None:
    original = _original()
    outer, inner = md.DetailsRecorder().start(), md.DetailsRecorder().start()
    wrapped = _original()
    assert wrapped is not original
    inner.stop()
    assert _original() is wrapped
    outer.stop()
    assert _original() is original


# --- the diff, on real components ---------------------------------------------------------------


def test_a_shape_change_is_named_by_the_inputs_that_differ(
    two_widths: dict[int, dict[str, dict[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    small, large = two_widths[4], two_widths[8]
    assert len(small) == len(large) == 2 and not set(small) & set(large)
    doc = md.ref_details(small, small)  # the bundle baked at width 4
    assert doc is not None and doc["omitted"] == 0 and set(doc["graphs"]) == set(small)
    bundled = md.read_details(json.loads(json.dumps(doc)))
    assert bundled is not None and bundled.as_sources() == small

    for key, ours in large.items():
        other, diffs = md.nearest(ours, bundled)
        theirs = small[other]
        # the nearest is the graph of the same pass (forward with forward, backward with backward)
        assert theirs["fx_kwargs[is_backward]"] == ours["fx_kwargs[is_backward]"], key
        names = [name for name, _, _ in diffs]
        assert names and all(name.startswith(("example_inputs[", "gm")) for name in names), names
        assert "inductor_config[max_autotune]" not in names
    forward = next(p for p in large.values() if p["fx_kwargs[is_backward]"].endswith("False"))
    _, diffs = md.nearest(forward, bundled)
    assert md.describe(*diffs[0]).startswith(f"{diffs[0][0]}: shape [8, 8] here, [4, 4] in the bundle"), diffs[0]

    with caplog.at_level(logging.DEBUG, logger="bundler.integrations.torch_missdiff"):
        phrase = md.explain_misses(large, bundled)
    assert phrase.startswith("FX misses explained (2 graphs): example_inputs[0"), phrase
    assert phrase.endswith(" differ"), phrase
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 2, info
    for line in info:
        assert line.startswith("torch compile cache: FX graph ") and " missed; nearest bundled graph " in line
        assert "shape e.g. [8, 8] here, [4, 4] in the bundle" in line or \
            "shape [8, 8] here, [4, 4] in the bundle" in line, line
        assert len(line) < 400, line
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("example_inputs[0]: shape [8, 8] here, [4, 4] in the bundle" in line for line in debug), debug


def test_components_are_compared_by_name_not_by_position() -> None:
    theirs = md.components(["[aaaa] gm: GraphModule()", "[bbbb] example_inputs[0]: TensorMetadata(dtype=f, "
                            "shape=torch.Size([8, 64]), stride=(64, 1))", "[cccc] fx_kwargs[is_backward]: False",
                            "[dddd] cpp_runtime_thread_count: 16"])
    ours = md.components(["[cccc] fx_kwargs[is_backward]: False", "[eeee] inductor_config[extra]: 1",
                          "[aaaa] gm: GraphModule()", "[ffff] cpp_runtime_thread_count: 2",
                          "[gggg] example_inputs[0]: TensorMetadata(dtype=f, shape=torch.Size([8, 16]), stride=(16, 1))",
                          "no hash here", "[hhhh] no colon"])
    assert list(ours) == ["fx_kwargs[is_backward]", "inductor_config[extra]", "gm", "cpp_runtime_thread_count",
                          "example_inputs[0]"]
    diffs = md.differences(ours, theirs)
    assert [name for name, _, _ in diffs] == ["inductor_config[extra]", "cpp_runtime_thread_count", "example_inputs[0]"]
    assert [md.describe(*d) for d in diffs] == [
        "inductor_config[extra]: not in the bundle",
        "cpp_runtime_thread_count: 2 here, 16 in the bundle",
        "example_inputs[0]: shape [8, 16] here, [8, 64] in the bundle, also stride",
    ]
    assert md.describe("gm", "[a] " + "x" * 100 + "1", "[b] " + "x" * 100 + "2") == \
        "gm: another graph (its code differs)"
    assert md.describe("k", "[a] " + "y" * 30 + "AB" + "z" * 60, "[b] " + "y" * 30 + "CD" + "z" * 60) == (
        "k: ...yyyyyyyyyyyyyABzzzzzzzzzzzzzzzzzzzzzzzzz... here, ...yyyyyyyyyyyyyCDzzzzzzzzzzzzzzzzzzzzzzzzz... "
        "in the bundle")
    assert md._grouped(["example_inputs[0]", "gm", "example_inputs[1]", "example_inputs[3]", "fx_kwargs[a]"]) == [
        "example_inputs[0-1,3]", "gm", "fx_kwargs[a]"]


# --- the ref field --------------------------------------------------------------------------------


def test_the_ref_field_is_capped_and_a_malformed_one_explains_nothing(
    two_widths: dict[int, dict[str, dict[str, str]]],
) -> None:
    graphs = {**two_widths[4], **two_widths[8]}
    full = md.ref_details(graphs, graphs)
    assert full is not None and full["omitted"] == 0 and len(full["graphs"]) == 4
    assert md._written_size(full) < 80_000, md._written_size(full)  # the settings are stored once
    assert len(full["common"]) > 500 and all(len(own) < 20 for own in full["graphs"].values())
    cap = md._written_size(full) - 100
    smaller = md.ref_details(graphs, graphs, cap=cap)
    assert smaller is not None and 0 < smaller["omitted"] < 4 and md._written_size(smaller) <= cap
    assert md.ref_details(graphs, graphs, cap=1000) is None
    assert md.ref_details(["fnot-in-the-source"], graphs) is None
    assert set(md.ref_details(list(two_widths[4]), two_widths[8], two_widths[4])["graphs"]) == set(two_widths[4])

    for raw in (None, "x", {"format": 99}, {"format": 1, "values": [1], "common": {}, "graphs": {}},
                {"format": 1, "values": []}):
        assert md.read_details(raw) is None, raw
    odd = md.read_details({"format": 1, "values": ["[h] v"], "common": {"a": 0, "b": 7}, "graphs": {"f1": {"c": "0"}}})
    assert odd is not None and odd.common == {"a": "[h] v"} and odd.graphs == {"f1": {}}
    assert md.explain_misses(two_widths[8], None) == ""


# --- the session ----------------------------------------------------------------------------------


def test_a_job_whose_graphs_miss_inside_a_hit_bundle_says_why(
    inductor_dir: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In process: bake a bundle at width 4, then a job at width 8 installs it and misses."""
    with bt.CompileCache(local_store_url, background=False) as producer:
        _train_step(4)
    assert producer.status == "miss" and "pushed" in producer.summary_line(), producer.summary_line()
    from bundler.remote.refs import read_ref
    from bundler.stores import open_store

    with open_store(local_store_url) as store:
        ref = read_ref(store, producer.ref)
    assert set(ref.extra["fx_key_details"]["graphs"]) == _fx_keys(inductor_dir)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "consumer"))
    with caplog.at_level(logging.INFO, logger="bundler"), \
            bt.CompileCache(local_store_url, background=False, push=False) as consumer:
        _train_step(8)
    assert consumer.status == "hit", consumer.reason
    summary = consumer.summary_line()
    assert "FX misses explained (2 graphs): example_inputs[0" in summary, summary
    lines = [r.getMessage() for r in caplog.records if "nearest bundled graph" in r.getMessage()]
    assert len(lines) == 2 and all("[8, 8] here, [4, 4] in the bundle" in line for line in lines), lines

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "same"))
    with bt.CompileCache(local_store_url, background=False, push=False) as same:
        _train_step(4)  # the bundle's own graphs: nothing missed, nothing to explain
    assert same.status == "hit" and "FX miss" not in same.summary_line(), same.summary_line()
