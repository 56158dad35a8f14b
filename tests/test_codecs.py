"""Compressed tensor codecs: error bounds, unbiasedness, sizes, strict decoding, frames."""

import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.strategies.fedavg import ClientUpdate, ElementwiseMean
from aggregator.strategies.robust import AdaptiveClipping, CoordinateMedian, NormClipping, TrimmedMean
from protocol.codecs import CODECS, CodecError, encode_decode, get_codec, parse_codec
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Blob, TensorEntry, Update, new_id
from protocol.quantized import QuantizedTensor, row_grid

SPECS = ["float32", "float16", "int8", "int8-row", "int4", "topk:0.1", "topk:0.1+int8"]
LOSSY = ["float16", "int8", "int8-row", "int4", "topk", "topk+int8"]


def _x(shape=(64, 50), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _entry(codec: str, shape, data: bytes, meta=None) -> TensorEntry:
    """An entry as the codec sees it, unvalidated: the codecs check what the schema already bounds (NaN scales, huge shapes)."""
    return TensorEntry.model_construct(name="t", codec=codec, dtype="float32", shape=list(shape), nbytes=len(data),
                                       meta=meta or {})


def _decode(codec: str, shape, data: bytes, meta=None) -> np.ndarray:
    return get_codec(codec).decode(memoryview(data), _entry(codec, shape, data, meta))


def test_float16_relative_error():
    x = _x()
    y = encode_decode(parse_codec("float16"), x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y - x) <= 1e-3 * np.abs(x) + 1e-7)


@pytest.mark.parametrize("spec,limit", [("int8", 127), ("int4", 7)])
def test_per_tensor_quantizers_error_within_one_step(spec, limit):
    x = _x(shape=(101,))  # odd length exercises int4 padding
    codec = parse_codec(spec)
    data, meta = codec.encode(x, rng=np.random.default_rng(1))
    assert meta["scale"] == pytest.approx(np.abs(x).max() / limit, rel=1e-6)
    y = codec.decode(memoryview(data), _entry(spec, x.shape, data, meta))
    assert np.all(np.abs(y - x) <= meta["scale"] * (1 + 1e-5))


def test_int8_row_error_within_row_scale():
    x = _x() * np.linspace(0.01, 10, 64, dtype=np.float32)[:, None]
    y = encode_decode(parse_codec("int8-row"), x, np.random.default_rng(2))
    row_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(y - x) <= row_scale * (1 + 1e-5))


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 0), (0, 4), (2, 3, 4)])
@pytest.mark.parametrize("spec", SPECS)
def test_every_codec_handles_odd_shapes(spec, shape):
    x = _x(shape=shape, seed=3)
    y = encode_decode(parse_codec(spec), x, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.float32


def test_zero_tensor_stays_zero():
    for spec in SPECS:
        assert not encode_decode(parse_codec(spec), np.zeros((5, 4), np.float32)).any()


def test_topk_keeps_exactly_the_k_largest():
    rng = np.random.default_rng(4)
    x = (rng.permutation(1000).astype(np.float32) + 1) * rng.choice([-1, 1], 1000)  # distinct magnitudes
    y = encode_decode(parse_codec("topk:0.05"), x)
    kept = np.flatnonzero(y)
    assert len(kept) == 50
    assert set(kept) == set(np.argsort(-np.abs(x))[:50])
    np.testing.assert_array_equal(y[kept], x[kept])
    assert not y[np.setdiff1d(np.arange(1000), kept)].any()


def test_topk_k_rounds_up_and_keeps_at_least_one():
    assert np.count_nonzero(encode_decode(parse_codec("topk:0.001"), _x(shape=(10,)))) == 1
    assert np.count_nonzero(encode_decode(parse_codec("topk:0.25"), _x(shape=(10,)))) == 3


def test_topk_layout_is_count_then_one_zlib_stream_of_bitmap_and_values():
    x = np.zeros(300_000, np.float32)
    positions = [0, 5, 70_000, 70_001, 200_000, 299_999]
    x[positions] = np.arange(1, 7, dtype=np.float32)
    codec = parse_codec("topk:0.00002")  # k = 6
    data, meta = codec.encode(x)
    assert struct.unpack_from("<I", data) == (6,) and meta == {}
    mask = np.zeros(300_000, bool)
    mask[positions] = True
    assert zlib.decompress(data[4:]) == np.packbits(mask).tobytes() + np.arange(1, 7, dtype="<f4").tobytes()
    assert len(data) < 4 + 1000  # 37.5 kB of mostly zero bitmap deflates to almost nothing
    np.testing.assert_array_equal(codec.decode(memoryview(data), _entry("topk", x.shape, data)), x)


@pytest.mark.parametrize("spec,shape", [("topk:1", (13,)), ("topk:1", (3, 5)), ("topk:0.1", (1,)), ("topk:0.1", ())])
def test_topk_keeping_every_element_is_exact(spec, shape):
    x = _x(shape=shape, seed=10)
    np.testing.assert_array_equal(encode_decode(parse_codec(spec), x), x)
    y = encode_decode(parse_codec(spec + "+int8"), x, np.random.default_rng(11))
    assert np.all(np.abs(y - x) <= np.abs(x).max() / 127 * (1 + 1e-5))


@pytest.mark.parametrize("spec", ["topk:0.1", "topk:0.1+int8"])
def test_topk_empty_tensor(spec):
    codec = parse_codec(spec)
    data, meta = codec.encode(np.zeros((0, 4), np.float32))
    assert struct.unpack_from("<I", data) == (0,) and zlib.decompress(data[4:]) == b""
    assert codec.decode(memoryview(data), _entry(codec.name, (0, 4), data, meta)).shape == (0, 4)


def test_topk_int8_kept_values_within_scale():
    x = _x(shape=(2000,))
    codec = parse_codec("topk:0.1+int8")
    data, meta = codec.encode(x, rng=np.random.default_rng(5))
    y = codec.decode(memoryview(data), _entry(codec.name, x.shape, data, meta))
    kept = np.argsort(-np.abs(x))[:200]
    assert np.all(np.abs(y[kept] - x[kept]) <= meta["scale"] * (1 + 1e-5))
    assert np.count_nonzero(y[np.setdiff1d(np.arange(2000), kept)]) == 0


@pytest.mark.parametrize("spec,limit", [("int8", 127), ("int8-row", 127), ("int4", 7), ("topk:1+int8", 127)])
def test_stochastic_rounding_is_unbiased(spec, limit):
    x = _x(shape=(4, 8), seed=6)
    codec, rng, runs = parse_codec(spec), np.random.default_rng(7), 2000
    decoded = np.stack([encode_decode(codec, x, rng) for _ in range(runs)]).astype(np.float64)
    peak = np.abs(x).max(axis=1, keepdims=True) if spec == "int8-row" else np.abs(x).max()
    step = (peak / np.float32(limit)).astype(np.float64)
    frac = np.mod(x / step, 1.0)
    sem = step * np.sqrt(frac * (1 - frac) / runs)  # exact standard error of the mean of stochastic rounding
    z = np.abs(decoded.mean(axis=0) - x) / np.maximum(sem, 1e-7)
    assert (z <= 3).mean() >= 0.95 and z.max() <= 4.5  # within 3 SE, allowing for 32 elements
    assert not np.all(decoded == decoded[0])  # actually stochastic


def test_rng_makes_encoding_reproducible():
    x = _x()
    for spec in ["int8", "int8-row", "int4", "topk:0.1+int8"]:
        a = parse_codec(spec).encode(x, rng=np.random.default_rng(9))
        b = parse_codec(spec).encode(x, rng=np.random.default_rng(9))
        assert a == b


def test_bytes_for_a_million_parameters():
    x = _x(shape=(1000, 1000))
    size = {spec: len(parse_codec(spec).encode(x)[0]) for spec in SPECS}
    assert size["float32"] == 4_000_000
    assert size["float16"] == 2_000_000
    assert size["int8"] == 1_000_000
    assert 1_000_000 < size["int8-row"] <= 1_004_000
    assert size["int4"] == 500_000
    # k = 100k kept of 1M: a deflated bitmap (~0.56 bit per element when positions are random) and values
    assert size["topk:0.1"] < 4_000_000 / 8
    assert size["topk:0.1+int8"] * 20 <= size["float32"]


def test_topk_int8_is_20x_smaller_than_float32_on_a_heavy_tailed_update():
    rng = np.random.default_rng(12)
    x = rng.standard_t(3, size=(1000, 1000)).astype(np.float32)  # heavy tails, like SGD updates
    x *= rng.lognormal(0, 1, size=(1000, 1)).astype(np.float32)  # rows of different magnitude
    x[:, rng.random(1000) < 0.15] *= 0.01  # quiet inputs (e.g. always-dark pixels)
    data, _ = parse_codec("topk:0.1+int8").encode(x, rng=rng)
    assert len(data) * 20 <= x.nbytes


# --- strict decoding of bad bytes -------------------------------------------------------------

def _sparse(k: int, bitmap: bytes, values=(), quantized=False, tail=b"") -> bytes:
    """Hand-made sparse bytes: uint32 k, then zlib(bitmap || values) and `tail`."""
    value_bytes = np.array(values, np.int8 if quantized else "<f4").tobytes()
    return struct.pack("<I", k) + zlib.compress(bitmap + value_bytes) + tail


_TWO = bytes([0b0110_0000, 0])  # n = 10: positions 1 and 2 kept
_BOMB = struct.pack("<I", 2) + zlib.compress(b"\0" * (16 << 20), 9)  # 16 kB that would inflate to 16 MB


BAD = [
    ("float16", (4,), b"\0" * 6, None, "bytes, expected 8"),
    ("float16", (2,), np.array([1, np.inf], "<f2").tobytes(), None, "NaN or Inf"),
    ("float16", (2,), np.array([1, np.nan], "<f2").tobytes(), None, "NaN or Inf"),
    ("int8", (4,), b"\1\2\3", {"scale": 0.1}, "bytes, expected 4"),
    ("int8", (4,), b"\1\2\3\4", {}, "scale"),
    ("int8", (4,), b"\1\2\3\4", {"scale": "x"}, "scale"),
    ("int8", (4,), b"\1\2\3\4", {"scale": -0.1}, "negative"),
    ("int8", (4,), b"\1\2\3\4", {"scale": float("nan")}, "NaN"),
    ("int8", (4,), b"\1\2\3\4", {"scale": float("inf")}, "Inf"),
    ("int8", (4,), b"\1\2\3\x80", {"scale": 0.1}, "outside"),
    ("int8-row", (2, 3), b"\0" * 13, None, "bytes, expected 14"),
    ("int8-row", (2, 3), np.array([1, np.nan], "<f4").tobytes() + b"\0" * 6, None, "row scale"),
    ("int8-row", (2, 3), np.array([1, -1], "<f4").tobytes() + b"\0" * 6, None, "row scale"),
    ("int8-row", (3,), np.array([np.inf], "<f4").tobytes() + b"\0" * 3, None, "row scale"),
    ("int4", (3,), b"\0", {"scale": 0.1}, "bytes, expected 2"),
    ("int4", (3,), b"\x00\x10", {"scale": 0.1}, "padding"),
    ("int4", (2,), b"\x08", {"scale": 0.1}, "-8"),
    ("int4", (2,), b"\x11", {"scale": -1.0}, "negative"),
    ("topk", (10,), b"\1\0\0", None, "shorter"),
    ("topk", (10,), _sparse(11, b"\xff\xc0", [1.0] * 11), None, "count 11 too large"),
    ("topk", (10**9,), _sparse(1, b"\x80", [1.0]), None, "axes of 0 to"),
    ("topk", (2**13, 2**14), _sparse(1, b"\x80", [1.0]), None, "exceed the limit"),
    ("float32", (0, 2**70), b"", None, "axes of 0 to"),
    ("int8", (2**40, 2**40, 0), b"", {"scale": 1.0}, "axes of 0 to"),
    ("int8-row", (0, 2**40, 2**40), b"", None, "axes of 0 to"),
    ("int4", (2**13, 2**13, 2**13), b"", {"scale": 1.0}, "exceed the limit"),
    ("topk", (10,), _sparse(2, bytes([0b0111_0000, 0]), [1.0, 2.0]), None, "3 bits set, expected 2"),
    ("topk", (10,), _sparse(3, bytes([0b0100_0000, 0]), [1.0, 2.0, 3.0]), None, "1 bits set, expected 3"),
    ("topk", (10,), _sparse(2, bytes([0b0100_0000, 0b0010_0000]), [1.0, 2.0]), None, "padding"),
    ("topk", (10,), _sparse(2, _TWO, [1.0, 2.0], tail=b"\0"), None, "1 bytes after the end"),
    ("topk", (10,), _sparse(2, _TWO, [1.0, 2.0])[:-3], None, "truncated"),
    ("topk", (10,), _sparse(2, _TWO, [1.0]), None, "inflates to 6 bytes, expected 10"),
    ("topk", (10,), _sparse(2, _TWO, [1.0, 2.0, 3.0]), None, "more than the expected 10"),
    ("topk", (10,), _BOMB, None, "more than the expected 10"),
    ("topk", (10,), struct.pack("<I", 2) + b"\x78\x9c\xff\xff\xff", None, "corrupt zlib"),
    ("topk", (10,), struct.pack("<I", 2) + zlib.compress(_TWO + b"\0" * 8)[2:], None, "corrupt zlib"),  # raw deflate
    ("topk", (10,), struct.pack("<I", 0), None, "truncated"),
    ("topk", (10,), _sparse(2, _TWO, [1.0, np.nan]), None, "NaN or Inf"),
    ("topk", (10,), _sparse(2, _TWO, [np.inf, 1.0]), None, "NaN or Inf"),
    ("topk", (10,), _sparse(2, _TWO, [-np.inf, 1.0]), None, "NaN or Inf"),
    ("topk+int8", (10,), _sparse(2, _TWO, [1, 2], True), {"scale": float("nan")}, "NaN"),
    ("topk+int8", (10,), _sparse(2, _TWO, [1, -128], True), {"scale": 1.0}, "outside"),
    ("topk+int8", (10,), _sparse(2, _TWO, [1], True), {"scale": 1.0}, "inflates to 3 bytes, expected 4"),
    ("topk+int8", (10,), _sparse(2, _TWO, [1, 2, 3], True), {"scale": 1.0}, "more than the expected 4"),
]


@pytest.mark.parametrize("codec,shape,data,meta,match", BAD)
def test_bad_payloads_are_rejected(codec, shape, data, meta, match):
    with pytest.raises(CodecError, match=match):
        _decode(codec, shape, data, meta)


def test_decompression_bomb_is_never_inflated_past_the_expected_size():
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="more than"):
            _decode("topk", (10,), _BOMB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # 16 MB had it been inflated


@pytest.mark.parametrize("spec", SPECS[1:])
def test_truncated_and_extended_payloads_are_rejected(spec):
    codec = parse_codec(spec)
    data, meta = codec.encode(_x(shape=(9, 7)))
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(CodecError):
            codec.decode(memoryview(bad), _entry(codec.name, (9, 7), bad, meta))


# --- frames and specs ---------------------------------------------------------------------------

def _update() -> Update:
    return Update(update_id=new_id(), round=1, base_version=0, tier="a", num_samples=5, steps=1,
                  train_loss=0.1, train_accuracy=0.5, train_seconds=0.1)


@pytest.mark.parametrize("spec", SPECS)
def test_full_frame_with_each_codec(spec):
    tensors = {"fc.weight": _x(shape=(30, 20)), "fc.bias": _x(shape=(20,), seed=1)}
    codec = parse_codec(spec)
    for how in (spec, codec):
        frame = decode_frame(encode_frame("fleet1", "dev-1", _update(), tensors, how))
        assert [e.codec for e in frame.header.tensors] == [codec.name] * 2
        for name, x in tensors.items():
            y = frame.tensors[name]
            assert y.shape == x.shape and y.dtype == np.float32
            assert np.abs(y - x).max() <= np.abs(x).max() * (1.0 if "topk" in spec else 0.2)


def test_uint8_blob_frame_still_works():
    blob = np.frombuffer(b"hello artifact", np.uint8)
    body = Blob(sha256="0" * 64, name="model.onnx")
    frame = decode_frame(encode_frame("fleet1", "agg", body, {"data": blob}, "uint8"))
    assert frame.tensors["data"].tobytes() == b"hello artifact"


@pytest.mark.parametrize("spec", ["", "float64", "topk", "topk:", "topk:0", "topk:-0.1", "topk:1.5", "topk:nan",
                                  "topk:inf", "topk:abc", "topk:0.1+int4", "topk:0.1+", "int8+topk", "topk+int8"])
def test_parse_codec_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        parse_codec(spec)


def test_parse_codec_names():
    assert {parse_codec(s).name for s in SPECS} == {"float32", "float16", "int8", "int8-row", "int4", "topk", "topk+int8"}
    assert parse_codec("topk:0.3").fraction == 0.3
    assert set(LOSSY) <= set(CODECS)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        CODECS["evil"] = CODECS["float32"]  # type: ignore[index]


# --- fuzzing: random input never escapes as anything but CodecError -----------------------------

_meta = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"scale": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**40),
                                              st.text(max_size=3))}),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(CODECS)), st.lists(st.integers(0, 40), max_size=3), st.binary(max_size=600), _meta)
def test_random_bytes_only_raise_codec_error(codec, shape, data, meta):
    coder = get_codec(codec)
    entry = TensorEntry.model_construct(name="t", codec=codec, dtype=coder.dtype, shape=shape, nbytes=len(data), meta=meta)
    try:
        out = coder.decode(memoryview(data), entry)
    except CodecError:
        return
    assert list(out.shape) == shape
    if out.dtype == np.float32:
        assert np.isfinite(out).all()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["topk", "topk+int8"]), st.integers(0, 300), st.integers(0, 40), st.binary(max_size=40),
       st.binary(max_size=200), st.sampled_from([b"", b"\0", b"xyz"]), st.integers(0, 3))
def test_structured_sparse_fuzz_only_raises_codec_error(codec, n, k, bitmap, values, tail, cut):
    data = struct.pack("<I", k) + zlib.compress(bitmap + values) + tail
    try:
        out = _decode(codec, (n,), data[: len(data) - cut], {"scale": 0.5})
    except CodecError:
        return
    assert out.shape == (n,) and np.isfinite(out).all() and np.count_nonzero(out) <= k


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["topk:0.1", "topk:0.3+int8", "topk:1"]), st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_sparse_encodings_of_random_tensors_decode_to_their_top_k(spec, n, seed):
    x = np.random.default_rng(seed).laplace(size=n).astype(np.float32)
    codec = parse_codec(spec)
    data, meta = codec.encode(x, rng=np.random.default_rng(seed))
    y = codec.decode(memoryview(data), _entry(codec.name, (n,), data, meta))
    k = struct.unpack_from("<I", data)[0]
    assert k == min(n, max(1, math.ceil(round(codec.fraction * n, 6))))
    kept = np.argsort(-np.abs(x), kind="stable")[:k]
    assert np.count_nonzero(y[np.setdiff1d(np.arange(n), kept)]) == 0
    if not codec.quantized:
        np.testing.assert_array_equal(y[kept], x[kept])


# --- quantised tensors: validated at decode, dequantised on demand or straight into a sum ----------

QUANTIZED = ["int8", "int8-row", "int4"]


def _quantized(spec: str, x: np.ndarray, seed: int = 0) -> QuantizedTensor:
    codec = parse_codec(spec)
    data, meta = codec.encode(x, rng=np.random.default_rng(seed))
    out = codec.decode(memoryview(data), _entry(codec.name, x.shape, data, meta))
    assert isinstance(out, QuantizedTensor)
    return out


@pytest.mark.parametrize("spec", QUANTIZED)
def test_quantized_tensor_stands_for_its_float32_array(spec):
    x = _x(shape=(6, 5)) * np.linspace(0.1, 5, 6, dtype=np.float32)[:, None]
    t = _quantized(spec, x)
    dense = np.asarray(t)
    assert t.shape == x.shape == dense.shape and t.dtype == np.float32 == dense.dtype and t.ndim == 2 and t.size == 30
    np.testing.assert_array_equal(t.dense(), dense)
    assert np.abs(dense - x).max() <= np.abs(x).max() / (127 if "int8" in spec else 7) * (1 + 1e-5)
    np.testing.assert_array_equal(t * 2.0, dense * 2.0)  # operators and ufuncs see the dense array
    np.testing.assert_array_equal(np.ones(5, np.float32) - t, 1 - dense)
    assert float(np.vdot(t, t)) == pytest.approx(float(np.vdot(dense, dense)))
    assert np.array(t, np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="new one"):
        np.asarray(t, copy=False)


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def compiled(request) -> bool:
    """Each fused-add kernel in turn: numba's compiled loop (when installed) and the numpy blocks."""
    if request.param:
        pytest.importorskip("numba")
    return request.param


# Shapes of one block, of several blocks of whole rows, of rows longer than a block, and of nothing.
@pytest.mark.parametrize("shape", [(300, 700), (700, 700), (600_000,), (2, 300_000), (3, 0), (0, 4), (), (5,), (2, 3, 4)])
@pytest.mark.parametrize("spec", QUANTIZED)
def test_fused_add_equals_dense_add_bit_for_bit(spec, shape, compiled):
    x = _x(shape=shape, seed=4) * np.float32(0.01)
    t = _quantized(spec, x)
    start = _x(shape=shape, seed=5)
    fused, dense = start.copy(), start.copy()
    weight = np.float32(37.3)  # not a power of two: (q * scale) * weight and q * (scale * weight) differ
    t.add_into(fused, weight, compiled)
    dense += np.asarray(t) * weight
    np.testing.assert_array_equal(fused, dense)


@pytest.mark.parametrize("spec", QUANTIZED)
def test_fused_add_into_a_heterofl_leading_block(spec, compiled):
    for full, block in [((40, 30), (20, 15)), ((8, 6, 3, 3), (4, 3, 3, 3)), ((8, 6, 5), (4, 3, 2)), ((50,), (25,))]:
        x = _x(shape=block, seed=6)
        t = _quantized(spec, x)
        fused, dense = np.ones(full, np.float32), np.ones(full, np.float32)
        where = tuple(slice(0, n) for n in block)
        t.add_into(fused[where], np.float32(3.3), compiled)
        dense[where] += np.asarray(t) * np.float32(3.3)
        np.testing.assert_array_equal(fused, dense)  # and nothing outside the block moved


def test_a_frame_in_a_mutable_buffer_is_decoded_from_a_copy():
    x = _x(shape=(10, 10))
    buffer = bytearray(encode_frame("f", "d", _update(), {"w": x}, "int8", rng=np.random.default_rng(0)))
    t = decode_frame(buffer).tensors["w"]
    before = np.asarray(t)
    buffer[-100:] = b"\x80" * 100  # -128, which decoding would have refused
    np.testing.assert_array_equal(np.asarray(t), before)


def test_fused_add_refuses_a_target_of_another_shape_or_dtype():
    t = _quantized("int8", _x(shape=(4, 5)))
    with pytest.raises(ValueError, match="cannot add"):
        t.add_into(np.zeros((5, 4), np.float32), np.float32(1))
    with pytest.raises(ValueError, match="cannot add"):
        t.add_into(np.zeros((4, 5), np.float64), np.float32(1))


@pytest.mark.parametrize("spec", ["int8", "int8-row"])
def test_fused_add_never_holds_the_dense_tensor(spec, compiled):
    x = _x(shape=(2000, 1000)) * np.float32(0.01)
    t = _quantized(spec, x)
    target = np.zeros(x.shape, np.float32)
    t.add_into(target, np.float32(2), compiled)  # compiled (and cached) before measuring
    tracemalloc.start()
    try:
        t.add_into(target, np.float32(2), compiled)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 4  # at most a cache-sized scratch (1 MB), not an 8 MB float32 copy


@pytest.mark.parametrize("spec", QUANTIZED)
def test_elementwise_mean_of_quantized_updates_equals_the_dense_mean(spec):
    shapes = {"w": (30, 20), "b": (30,)}
    global_weights = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    fused, dense = ElementwiseMean(global_weights), ElementwiseMean(global_weights)
    for i, (samples, block) in enumerate([(10, {"w": (30, 20), "b": (30,)}), (25, {"w": (15, 10), "b": (15,)})]):
        frame = decode_frame(encode_frame("f", "d", _update(), {n: _x(s, seed=i) for n, s in block.items()}, spec,
                                          rng=np.random.default_rng(i)))
        assert all(isinstance(v, QuantizedTensor) for v in frame.tensors.values())
        fused.add(ClientUpdate("d", "a", samples, frame.tensors, scale=0.5))
        dense.add(ClientUpdate("d", "a", samples, {n: np.asarray(v) for n, v in frame.tensors.items()}, scale=0.5))
    for name in shapes:
        np.testing.assert_array_equal(fused.result()[name], dense.result()[name])


@pytest.mark.parametrize("factory", [
    lambda g: NormClipping(g, clip_norm=1.0),  # clips the second update, not the first
    lambda g: AdaptiveClipping(g),
    lambda g: CoordinateMedian(g),
    lambda g: TrimmedMean(g, beta=0.2),
])
def test_other_accumulators_take_quantized_updates_as_the_arrays_they_stand_for(factory):
    global_weights = {"w": np.zeros((12, 8), np.float32)}
    quantized, dense = factory(global_weights), factory(global_weights)
    for i, size in enumerate([0.01, 1.0, 0.1, 0.5, 0.05]):
        (t,) = decode_frame(encode_frame("f", "d", _update(), {"w": _x((12, 8), seed=i) * np.float32(size)}, "int8-row",
                                         rng=np.random.default_rng(i))).tensors.values()
        quantized.add(ClientUpdate("d", "a", 10 + i, {"w": t}))
        dense.add(ClientUpdate("d", "a", 10 + i, {"w": np.asarray(t)}))
    np.testing.assert_array_equal(quantized.result()["w"], dense.result()["w"])


@pytest.mark.parametrize("shape", [(6, 5), (7,), (), (0, 4), (3, 0), (2, 3, 4)])
@pytest.mark.parametrize("spec", QUANTIZED)
def test_a_quantized_tensor_rebuilt_from_its_parts_is_the_same_tensor(spec, shape):
    x = _x(shape=shape, seed=7) * np.float32(0.3)
    t = _quantized(spec, x)
    rows, _ = row_grid(shape)
    assert t.codes.dtype == np.int8 and t.codes.shape == (math.prod(shape),)
    assert t.scales.dtype == np.float32 and t.scales.shape == ((rows,) if spec == "int8-row" else (1,))
    again = QuantizedTensor(t.codes.copy(), t.scales.copy(), t.shape)
    assert again.shape == t.shape
    np.testing.assert_array_equal(again.codes, t.codes)
    np.testing.assert_array_equal(again.scales, t.scales)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(t))
    fused, expected = np.ones(shape, np.float32), np.ones(shape, np.float32)
    again.add_into(fused, np.float32(3.7))
    t.add_into(expected, np.float32(3.7))
    np.testing.assert_array_equal(fused, expected)


def test_the_parts_of_a_quantized_tensor_are_read_only():
    t = _quantized("int8-row", _x(shape=(4, 5)))
    before = np.asarray(t)
    with pytest.raises(ValueError, match="read-only"):
        t.codes[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        t.scales[0] = 1
    np.testing.assert_array_equal(np.asarray(t), before)


@pytest.mark.parametrize("codes, scales, shape, match", [
    (np.zeros(20, np.int16), np.ones(1, np.float32), (4, 5), "needs 20 int8 values, not 20 of int16"),
    (np.zeros(19, np.int8), np.ones(1, np.float32), (4, 5), "needs 20 int8 values, not 19"),
    (np.zeros(20, np.int8), np.ones(3, np.float32), (4, 5), "needs 1 scale or 4 .one per row., not 3"),
    (np.zeros(20, np.int8), np.ones(0, np.float32), (4, 5), "not 0"),
])
def test_a_quantized_tensor_refuses_parts_that_do_not_fit_its_shape(codes, scales, shape, match):
    with pytest.raises(ValueError, match=match):
        QuantizedTensor(codes, scales, shape)
