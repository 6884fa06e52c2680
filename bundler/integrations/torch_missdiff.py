"""Why an FX graph missed inside a bundle that hit: its components against the nearest bundled graph.

A bundle can install and still miss its FX graphs: the job has another model width, another
input shape, another Inductor setting applied at compile time (``mode="max-autotune"``), another
thread count. Inductor's FX graph key hashes a list of components, and
``torch._inductor.codecache.compiled_fx_graph_hash(gm, example_inputs, fx_kwargs, inputs_to_check)``
returns the key with one debug line per component: ``[<hash>] <name>: <value>``, e.g.
``[b2a3...] example_inputs[0]: TensorMetadata(dtype=torch.float32, shape=torch.Size([8, 16]), ...)``,
``[...] fx_kwargs[is_backward]: False``, ``[...] gm: GraphModule() def forward(...)``,
``[...] inductor_config[max_autotune]: False`` (about 640 lines, 70 kB for a small graph on torch
2.13; most are Inductor settings, the same in every graph).

* Capture (:class:`DetailsRecorder`): while a session is open, the module attribute is wrapped (its
  one caller, ``FxGraphCache.prepare_key``, calls it through the module global) and every key
  this process computes is kept with its components, shortened (:func:`components`).
* Producer (:func:`ref_details`): the ref's ``extra["fx_key_details"]`` holds the components of the
  FX graphs the pushed bundle holds, compactly: each distinct component text once (``values``),
  the components every listed graph shares once (``common``), and per graph the rest (``graphs``),
  as ``name -> index into values``.
* Consumer (:func:`explain_misses`): at the end of a session whose bundle hit, each FX key this
  process computed that was not in the cache (a miss) is compared, component by component (by
  name, not by line position), with every bundled graph; the one with the most identical
  components is named with what differs: one INFO line per missed graph, the full list at DEBUG,
  and a short phrase for the session's summary line.

Nothing here raises into the job. A torch whose function is missing or has another signature is
not wrapped (then nothing is explained). AOTAutograd keys are not diffed: an AOTAutograd miss
shows up as the FX graph misses under it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from bundler.integrations.torch_hooks import Recorder, SharedHooks, parameters_if, replace
from bundler.integrations.torch_lookups import FX, installed_keys

log = logging.getLogger(__name__)

__all__ = ["Bundled", "DetailsRecorder", "components", "describe", "differences", "explain_misses", "explain_session",
           "for_ref", "nearest", "read_details", "ref_details"]

#: The function wrapped, and the leading parameters its signature must have.
_MODULE, _ATTR = "torch._inductor.codecache", "compiled_fx_graph_hash"
_PARAMS = ("gm", "example_inputs", "fx_kwargs", "inputs_to_check")
#: A component as kept: ``[<hash, first 20 characters>] <value, whitespace collapsed>``, with the
#: name at most 300 characters in all (a graph's code is cut: its hash still tells it apart).
_LINE_CHARS = 300
_HASH_CHARS = 20
_NAME_CHARS = 120
#: ``fx_key_details`` in a ref at most this large as written (JSON, indented): refs are read with a
#: 1 MiB cap (``stores.base.SMALL_OBJECT_LIMIT``) and also carry the settings. Graphs past it are
#: left out and counted in ``omitted``.
REF_DETAILS_CAP = 256 * 1024
#: Graphs whose components one process keeps at most (a job that compiles thousands of graphs).
_MAX_RECORDED = 4096
#: Missed graphs given an INFO line each at most; the rest go to DEBUG.
_MAX_INFO_LINES = 10
#: Differing components named in a graph's INFO line at most.
_MAX_NAMED = 3
_FORMAT = 1


# --- components ---------------------------------------------------------------------------------


def components(debug_lines: Iterable[Any]) -> dict[str, str]:
    """Inductor's debug lines as ``{name: "[hash] value"}``, shortened (see the module docstring).

    The name is the text between ``] `` and the first ``:``; lines that do not look like
    ``[hash] name: value`` are skipped.
    """
    out: dict[str, str] = {}
    for line in debug_lines:
        if not isinstance(line, str) or not line.startswith("["):
            continue
        close = line.find("] ")
        colon = line.find(":", close + 2)
        if close < 2 or colon < 0:
            continue
        digest = line[1:close][:_HASH_CHARS]
        name = line[close + 2 : colon].strip()[:_NAME_CHARS]
        value = _simplify(" ".join(line[colon + 1 :].split()))
        room = _LINE_CHARS - len(name) - len(digest) - 5
        if len(value) > room:
            value = value[: max(room - 3, 20)] + "..."
        out.setdefault(name, f"[{digest}] {value}")
    return out


def _simplify(value: str) -> str:
    return re.sub(r"torch\.Size\((\[[^\]]*\])\)", r"\1", value)


def _digest(text: str) -> str:
    return text.split("] ", 1)[0]


def _value(text: str) -> str:
    return text.split("] ", 1)[1] if "] " in text else ""


# --- the recorder ---------------------------------------------------------------------------------


class DetailsRecorder(Recorder):
    """The components of every FX graph key this process computes between :meth:`start` and
    :meth:`stop`. Thread-safe; never raises. ``watching``: whether this torch could be wrapped."""

    what = "FX graph key components"

    def __init__(self) -> None:
        super().__init__()
        self._details: dict[str, dict[str, str]] = {}
        self._texts: dict[str, str] = {}

    @property
    def watching(self) -> bool:
        return bool(self.watched)

    def record(self, key: str, lines: list[str]) -> None:
        """Keep the components of FX key ``key`` (Inductor's debug ``lines``), parsed only while
        under the cap: a key is computed on every compile, and a parse is ~640 lines of regex."""
        with self._lock:
            if key not in self._details and len(self._details) >= _MAX_RECORDED:
                return
        parts = components(lines)
        with self._lock:
            # one copy of each name and text: most are the same in every graph (the settings)
            self._details[key] = {self._texts.setdefault(name, name): self._texts.setdefault(text, text)
                                  for name, text in parts.items()}

    def details(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return dict(self._details)


def _wrap(deliver: Any) -> tuple[Any, bool]:
    """Wrap ``compiled_fx_graph_hash`` where this torch has the one we know: (undo, whether wrapped)."""
    where = f"{_MODULE}.{_ATTR}"
    try:
        module = importlib.import_module(_MODULE)
        func = module.__dict__[_ATTR]
    except Exception as exc:  # noqa: BLE001 - absent in this torch
        log.debug("no %s: %s", where, exc)
        return _nothing_to_undo, False
    if not inspect.isfunction(func) or parameters_if(func, _PARAMS, where) is None:
        return _nothing_to_undo, False

    def compiled_fx_graph_hash(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        try:
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str) \
                    and isinstance(result[1], list):
                deliver(result[0], result[1])  # each recorder parses what it keeps
        except Exception:  # noqa: BLE001, S110 - recording is a courtesy; the key is returned as is
            pass
        return result

    compiled_fx_graph_hash.__wrapped__ = func  # type: ignore[attr-defined]
    compiled_fx_graph_hash.__doc__ = func.__doc__
    return replace(module, _ATTR, func, compiled_fx_graph_hash, where), True


def _nothing_to_undo() -> None:
    pass


DetailsRecorder.hooks = SharedHooks(_wrap, nothing=False)


# --- the ref field ------------------------------------------------------------------------------


def ref_details(
    fx_keys: Iterable[str], *sources: Mapping[str, Mapping[str, str]], cap: int = REF_DETAILS_CAP
) -> dict[str, Any] | None:
    """``extra["fx_key_details"]`` for a bundle holding ``fx_keys``: the components of those graphs
    found in ``sources`` (this process's recorder, then the installed bundle's), at most ``cap``
    bytes as the ref writes it; None when there are none."""
    wanted = set(fx_keys)
    graphs: dict[str, Mapping[str, str]] = {}
    for source in sources:
        for key, parts in source.items():
            if key in wanted and key not in graphs and parts:
                graphs[key] = parts
    if not graphs:
        return None
    keys = sorted(graphs)
    shared = dict(graphs[keys[0]])
    for key in keys[1:]:
        parts = graphs[key]
        shared = {name: text for name, text in shared.items() if parts.get(name) == text}
    values: list[str] = []
    index: dict[str, int] = {}

    def ref(text: str) -> int:
        if text not in index:
            index[text] = len(values)
            values.append(text)
        return index[text]

    common = {name: ref(text) for name, text in shared.items()}
    own: dict[str, dict[str, int]] = {}
    for key in keys:
        own[key] = {name: ref(text) for name, text in graphs[key].items() if name not in shared}
    kept = list(keys)
    while kept:
        doc = _encode(values, common, {key: own[key] for key in kept}, len(keys) - len(kept))
        if _written_size(doc) <= cap:
            return doc
        kept = kept[: len(kept) * 3 // 4] if len(kept) > 4 else kept[:-1]
    return None


def _encode(values: list[str], common: dict[str, int], own: dict[str, dict[str, int]], omitted: int) -> dict[str, Any]:
    used = sorted({*common.values(), *(i for parts in own.values() for i in parts.values())})
    renumber = {old: new for new, old in enumerate(used)}
    return {
        "format": _FORMAT,
        "values": [values[i] for i in used],
        "common": {name: renumber[i] for name, i in common.items()},
        "graphs": {key: {name: renumber[i] for name, i in parts.items()} for key, parts in own.items()},
        "omitted": omitted,
    }


def _written_size(doc: dict[str, Any]) -> int:
    """Its size inside a ref as ``refs.write_ref`` writes it (``extra`` -> this field, indented)."""
    return len(json.dumps({"extra": {"fx_key_details": doc}}, sort_keys=True, indent=1))


class Bundled:
    """A bundle's ``fx_key_details``, read back: the components shared by every graph, and each
    graph's own."""

    def __init__(self, common: dict[str, str], graphs: dict[str, dict[str, str]]) -> None:
        self.common, self.graphs = common, graphs

    def components(self, key: str) -> dict[str, str]:
        return {**self.common, **self.graphs[key]}

    def as_sources(self) -> dict[str, dict[str, str]]:
        return {key: self.components(key) for key in self.graphs}


def read_details(raw: Any) -> Bundled | None:
    """A ref's ``fx_key_details`` (None when absent or not one this release can read)."""
    try:
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            return None
        values = [v for v in raw["values"] if isinstance(v, str)]
        if len(values) != len(raw["values"]):
            return None

        def parts(mapping: Any) -> dict[str, str]:
            return {str(name): values[i] for name, i in mapping.items() if isinstance(i, int) and 0 <= i < len(values)}

        common = parts(raw["common"])
        graphs = {str(key): parts(own) for key, own in raw["graphs"].items() if isinstance(own, dict)}
        return Bundled(common, graphs)
    except Exception as exc:  # noqa: BLE001 - a malformed field explains nothing; it never fails the job
        log.debug("unreadable fx_key_details in the ref: %s: %s", type(exc).__name__, exc)
        return None


# --- the diff -------------------------------------------------------------------------------------


def differences(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """``(name, ours, theirs)`` for every component whose hash differs or that one side lacks, in
    our order, then the bundle's."""
    out: list[tuple[str, str | None, str | None]] = []
    for name, text in ours.items():
        other = theirs.get(name)
        if other is None or _digest(other) != _digest(text):
            out.append((name, text, other))
    out.extend((name, None, text) for name, text in theirs.items() if name not in ours)
    return out


def nearest(ours: Mapping[str, str], bundled: Bundled) -> tuple[str, list[tuple[str, str | None, str | None]]] | None:
    """The bundled graph with the most components identical to ours (ties: fewest differing, then
    the first key), and how it differs."""
    common = bundled.common
    shared = sum(1 for name, text in common.items() if _same(ours.get(name), text))
    best: tuple[int, int, str] | None = None
    for key in sorted(bundled.graphs):
        own = bundled.graphs[key]  # its components beyond the common ones (the ref keeps them apart)
        same = shared + sum(1 for name, text in own.items() if name not in common and _same(ours.get(name), text))
        theirs = len(common) + sum(1 for name in own if name not in common)
        score = (-same, len(ours) + theirs - 2 * same, key)  # most identical, then fewest differing
        if best is None or score < best:
            best = score
    if best is None:
        return None
    key = best[2]
    return key, differences(ours, bundled.components(key))


def _same(ours: str | None, theirs: str) -> bool:
    return ours is not None and _digest(ours) == _digest(theirs)


def describe(name: str, ours: str | None, theirs: str | None, width: int = 40) -> str:
    """``example_inputs[0]: shape [8, 16] here, [8, 64] in the bundle``, shortened to about ``width``
    characters a side."""
    return f"{name}: {_detail(name, ours, theirs, width)[1]}"


def _detail(name: str, ours: str | None, theirs: str | None, width: int) -> tuple[tuple[str, ...], str]:
    """What kind of difference (for grouping like ones) and how to say it."""
    if ours is None:
        return ("absent here",), "only in the bundle"
    if theirs is None:
        return ("absent there",), "not in the bundle"
    a, b = _value(ours), _value(theirs)
    fields = _field_differences(a, b)
    if fields:
        first, here, there = fields[0]
        here, there = _window(here, there, width)
        text = f"{first} {here} here, {there} in the bundle"
        if len(fields) > 1:
            text += ", also " + ", ".join(field for field, _, _ in fields[1:3]) + (" ..." if len(fields) > 3 else "")
        return ("fields", *(field for field, _, _ in fields)), text
    if name == "gm" and width < _LINE_CHARS:
        return ("value",), "another graph (its code differs)"
    if a == b:
        return ("value",), f"differs past the {len(a)} characters kept"
    here, there = _window(a, b, width)
    return ("value",), f"{here} here, {there} in the bundle"


def _said_briefly(diffs: list[tuple[str, str | None, str | None]]) -> list[str]:
    """One phrase per kind of difference (by name, and the first field that differs):
    ``example_inputs[0-4]: shape e.g. [16, 16] here, [64, 64] in the bundle, also stride``."""
    groups: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
    for name, ours, theirs in diffs:
        match = re.match(r"^(.*)\[(\d+)\]$", name)
        kind, text = _detail(name, ours, theirs, 40)
        groups.setdefault((match.group(1) if match else name, kind[:2]), []).append((name, text))
    out = []
    for (_, kind), members in groups.items():
        names, text = [name for name, _ in members], members[0][1]
        if len(members) == 1:
            out.append(f"{names[0]}: {text}")
        elif kind[0] == "fields":
            out.append(f"{_grouped(names)[0]}: {kind[1]} e.g. {text[len(kind[1]) + 1:]}")
        else:
            out.append(f"{_grouped(names)[0]}: e.g. {text}")
    return out


def _field_differences(a: str, b: str) -> list[tuple[str, str, str]]:
    """For ``Name(k=v, ...)`` values of one type, the fields that differ (a field cut short by the
    recorded length is not compared)."""
    fa, fb = _fields(a), _fields(b)
    if fa is None or fb is None or fa[0] != fb[0]:
        return []
    out = []
    for field, value in fa[1].items():
        other = fb[1].get(field)
        if other is not None and other != value:
            out.append((field, value, other))
    return out


def _fields(value: str) -> tuple[str, dict[str, str]] | None:
    match = re.match(r"^(\w+)\((.*)$", value)
    if not match:
        return None
    body, cut = match.group(2), value.endswith("...")
    if cut:
        body = body[:-3]
    elif body.endswith(")"):
        body = body[:-1]
    else:
        return None
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    if not cut:
        parts.append(body[start:])
    fields = {}
    for part in parts:
        field, eq, val = part.strip().partition("=")
        if not eq:
            return None
        fields[field] = val
    return match.group(1), fields


def _window(a: str, b: str, width: int) -> tuple[str, str]:
    """Both values, cut to about ``width`` characters around where they first differ."""
    if len(a) <= width and len(b) <= width:
        return a or "''", b or "''"
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, first - width // 3)

    def cut(text: str) -> str:
        piece = text[start : start + width]
        return ("..." if start else "") + piece + ("..." if start + width < len(text) else "")

    return cut(a), cut(b)


def _grouped(names: Iterable[str]) -> list[str]:
    """``example_inputs[0]``, ``example_inputs[1]``, ``gm`` -> ``example_inputs[0-1]``, ``gm``."""
    order: list[str] = []
    indices: dict[str, list[int]] = {}
    for name in names:
        match = re.match(r"^(.*)\[(\d+)\]$", name)
        base = match.group(1) if match else name
        if base not in indices:
            order.append(base)
            indices[base] = []
        if match:
            indices[base].append(int(match.group(2)))
        else:
            indices[base].append(-1)
    out = []
    for base in order:
        numbers = sorted({i for i in indices[base] if i >= 0})
        if -1 in indices[base]:
            out.append(base)
        if numbers:
            out.append(f"{base}[{_ranges(numbers)}]")
    return out


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def explain_misses(missed: Mapping[str, Mapping[str, str]], bundled: Bundled | None) -> str:
    """Log why each missed FX graph missed (INFO: one line a graph; DEBUG: every differing
    component) and return the summary phrase (empty when nothing could be explained)."""
    if not missed:
        return ""
    if bundled is None or not bundled.graphs:
        log.debug("torch compile cache: %d FX graphs missed; the bundle holds no graph details to compare with",
                  len(missed))
        return ""
    named: dict[str, int] = {}
    explained = 0
    for n, key in enumerate(sorted(missed)):
        found = nearest(missed[key], bundled)
        if found is None:
            continue
        other, diffs = found
        explained += 1
        for name, _, _ in diffs:  # differences() names each component once
            named[name] = named.get(name, 0) + 1
        if not diffs:
            line = (f"torch compile cache: FX graph {key[:8]} missed; nearest bundled graph {other[:8]} "
                    "has the same components (its entry's guards did not hold?)")
        else:
            phrases = _said_briefly(diffs)
            shown = "; ".join(phrases[:_MAX_NAMED])
            more = f"; +{len(phrases) - _MAX_NAMED} more (DEBUG)" if len(phrases) > _MAX_NAMED else ""
            line = (f"torch compile cache: FX graph {key[:8]} missed; nearest bundled graph {other[:8]} "
                    f"differs in {shown}{more}")
        log.log(logging.INFO if n < _MAX_INFO_LINES else logging.DEBUG, "%s", line)
        for diff in diffs:
            log.debug("torch compile cache: FX graph %s vs bundled %s: %s", key[:8], other[:8],
                      describe(*diff, width=_LINE_CHARS))
    if len(missed) > _MAX_INFO_LINES:
        log.info("torch compile cache: %d more missed FX graphs explained at DEBUG", len(missed) - _MAX_INFO_LINES)
    if not explained:
        return ""
    groups = _grouped(sorted(named, key=lambda name: -named[name]))
    listed = ", ".join(groups[:4]) + (", ..." if len(groups) > 4 else "")
    head = "FX miss explained" if explained == 1 else f"FX misses explained ({explained} graphs)"
    if not groups:
        return f"{head}: no component differs"
    return f"{head}: {listed} {'differs' if len(named) == 1 else 'differ'}"


# --- the session's two calls ----------------------------------------------------------------------


def for_ref(members: Iterable[str], recorder: DetailsRecorder | None, bundled: Bundled | None) -> dict[str, Any] | None:
    """``extra["fx_key_details"]`` for a push of ``members``: the components this process recorded,
    then those the installed bundle carried, of the FX graphs the pushed bundle holds."""
    try:
        keys = installed_keys(members)[FX]
        ours = recorder.details() if recorder is not None else {}
        return ref_details(keys, ours, bundled.as_sources() if bundled is not None else {})
    except Exception as exc:  # noqa: BLE001 - a courtesy for later readers; never fails the push
        log.debug("no fx_key_details for the ref: %s: %s", type(exc).__name__, exc)
        return None


def explain_session(recorder: DetailsRecorder | None, present: Iterable[str], bundled: Bundled | None) -> str:
    """Explain the FX graphs this process computed whose keys were not in the cache before its
    compiles (``present``: the member names there then, the installed bundle's among them)."""
    try:
        if recorder is None:
            return ""
        there = installed_keys(present)[FX]
        missed = {key: parts for key, parts in recorder.details().items() if key not in there}
        return explain_misses(missed, bundled)
    except Exception as exc:  # noqa: BLE001 - explaining is a courtesy
        log.debug("FX misses not explained: %s: %s", type(exc).__name__, exc)
        return ""
