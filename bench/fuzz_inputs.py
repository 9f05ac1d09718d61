"""Input strategies for the fuzzing of bench/reliability_fuzz.py: hostile and valid text, numbers and values for
``key=value`` overrides, JSON documents, and damaged copies of a valid file (truncated, overwritten, non-UTF-8)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

CONTROL = st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=6)
UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
WORDS = st.sampled_from(["Paris", " Rome", "The Eiffel Tower", "{}", "{}{}", "{", "}", "=", "==", "'", '"', "\\",
                         "[", "]", "null", "~", "#", "${oc.env:HOME}", "${x}", "%s", "\u202e", "\x00", "é", "日本",
                         "🙂", " ", "\n", "\t"])
TEXT = st.one_of(
    st.lists(st.one_of(WORDS, UNICODE, CONTROL), max_size=5).map("".join),
    st.just(""), st.just("x" * 5000), st.just("{} " * 3000),
)
# valid text of any script, with control characters and odd punctuation, but no placeholder, never blank and
# without NUL (no command line can carry one)
FREE = st.lists(st.one_of(WORDS, UNICODE, CONTROL), min_size=1, max_size=5).map("".join).map(
    lambda t: t.replace("{", "(").replace("}", ")").replace("\x00", "")).filter(lambda t: t.strip() != "")
VALID_PROMPT = st.tuples(FREE, FREE).map(lambda ab: f"{ab[0]}{{}}{ab[1]}")
PROMPT = st.one_of(
    VALID_PROMPT, VALID_PROMPT, VALID_PROMPT,  # one placeholder: valid
    st.tuples(TEXT, TEXT).map(lambda ab: f"{ab[0]}{{}}{ab[1]}"),  # one placeholder, hostile text around it
    st.tuples(TEXT, TEXT).map(lambda ab: f"{ab[0]}{{}}{{}}{ab[1]}"),  # doubled
    TEXT,  # usually none
)
FIELD = st.one_of(FREE, FREE, FREE, FREE, FREE, TEXT)  # five draws in six are valid


def maybe(s: st.SearchStrategy) -> st.SearchStrategy:
    """The value, or (one time in five) the key left out."""
    return st.one_of(s, s, s, s, st.none())
NUMBERS = st.one_of(
    st.integers(-5, 40), st.just(-(10**30)), st.just(10**30), st.sampled_from(["nan", "inf", "-inf", "1e999", "-0.0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
VALUES = st.one_of(
    NUMBERS.map(str), st.sampled_from(["", "[]", "{}", "[[]]", "[1,[2]]", "[-1]", "[99]", "[0,0]", "[a, b]", "true",
                                      "false", "null", "~", "{a: 1}", "[1", "x: y", "0x10", "1_000", "'1'", "???"]),
    st.lists(NUMBERS.map(str), max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
    TEXT,
)
COSTLY = ("limit", "steps", "tokens", "samples", "chunks", "epochs", "max_", "n_", "num_", "every", "seq_len",
          "length", "size", "noise", "rank", "width", "repeats", "hidden", "interval", "count", "_len", "generation")


def cheap(key: str, value: str) -> bool:
    """Huge or long-running settings are valid (a user may ask for 10^30 steps); they are left out, not refused."""
    if not any(c in key.lower() for c in COSTLY):
        return True
    try:
        return float(value) <= 64 or value.strip().lower() in ("nan", "inf", "1e999")
    except ValueError:
        return True


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)


def mutate(doc: Any, path: list[int], value: Any, delete: bool) -> Any:
    """Replace (or delete) the node reached by following ``path`` (indices into keys / items)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc.keys()) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[path[0] % len(keys)]
    if delete and len(path) == 1:
        doc = dict(doc) if isinstance(doc, dict) else list(doc)
        del doc[k]
        return doc
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    doc[k] = mutate(doc[k], path[1:], value, delete)
    return doc


def file_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid file, truncated, with a byte run overwritten, with non-UTF-8 bytes, or replaced by junk."""
    return st.one_of(
        st.integers(0, len(valid)).map(lambda i: valid[:i]),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=8)).map(
            lambda t: valid[:t[0]] + t[1] + valid[t[0] + len(t[1]):]),
        st.integers(0, len(valid)).map(lambda i: valid[:i] + b"\xff\xfe\x80" + valid[i:]),
        st.binary(max_size=64),
    )
