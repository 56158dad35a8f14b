"""Secure aggregation: Shamir sharing, exact sums over mixed tiers with dropouts, privacy of the masked inputs, refusals."""

from __future__ import annotations

import base64
import itertools
import json
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from protocol.blocks import leading_slices
from protocol.secagg import shamir
from protocol.secagg.device import SecAggDevice
from protocol.secagg.messages import (AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, Phase, SecAggError,
                                      SecAggParams, ShareDelivery, UnmaskRequest, quantize)
from protocol.secagg.server import SecAggServer
from protocol.secagg.shamir import ShamirError
from tests.secagg_driver import DeviceRound, run_secure_round

GLOBAL = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,)}
WIDTHS = {"d0": 1.0, "d1": 0.5, "d2": 0.25, "d3": 1.0, "d4": 0.5, "d5": 0.25}


def _tier_shapes(width: float) -> dict[str, tuple[int, ...]]:
    out, inp = math.ceil(8 * width), math.ceil(4 * width)
    return {"conv.weight": (out, inp, 3, 3), "conv.bias": (out,)}


def _inputs(seed: int = 0, widths: dict[str, float] = WIDTHS) -> dict[str, DeviceRound]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for index, (device, width) in enumerate(widths.items()):
        shapes = _tier_shapes(width)
        update = {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in shapes.items()}
        inputs[device] = DeviceRound(shapes=shapes, update=update, weight=float(10 + 7 * index))
    return inputs


def _plain_sums(params: SecAggParams, inputs: dict[str, DeviceRound], included: list[str]):
    """Sum of quantized weighted updates, float sums, masses and counts, computed in the clear."""
    quantized = {n: np.zeros(s, np.int64) for n, s in params.shapes.items()}
    floats = {n: np.zeros(s, np.float64) for n, s in params.shapes.items()}
    mass = {n: np.zeros(s, np.float64) for n, s in params.shapes.items()}
    counts = {n: np.zeros(s, np.int64) for n, s in params.shapes.items()}
    for device in included:
        part = inputs[device]
        for name, values in part.update.items():
            block = leading_slices(values.shape)
            weighted = values.astype(np.float64) * part.weight
            quantized[name][block] += quantize(weighted, params)
            floats[name][block] += weighted
            mass[name][block] += part.weight
            counts[name][block] += 1
    return quantized, floats, mass, counts


# ---------------------------------------------------------------- Shamir

@pytest.mark.parametrize("length", [0, 1, 15, 16, 32, 47])
def test_shamir_any_threshold_subset_reconstructs(length):
    rng = np.random.default_rng(length)
    secret = rng.bytes(length)
    threshold, points = 3, [1, 2, 3, 4, 5, 6]
    shares = shamir.split(secret, threshold, points)
    for subset in itertools.combinations(shares, threshold):
        assert shamir.reconstruct(list(subset)) == secret
    for _ in range(20):  # random subsets of random sizes >= threshold, in random order
        size = int(rng.integers(threshold, len(shares) + 1))
        chosen = [shares[i] for i in rng.permutation(len(shares))[:size]]
        assert shamir.reconstruct(chosen) == secret


def test_shamir_refuses_below_threshold_duplicates_and_mixed_splits():
    secret = bytes(range(32))
    shares = shamir.split(secret, 4, [3, 5, 7, 9, 11])
    for subset in itertools.combinations(shares, 3):
        with pytest.raises(ShamirError, match="need 4 shares"):
            shamir.reconstruct(list(subset))
    with pytest.raises(ShamirError, match="duplicate"):
        shamir.reconstruct([shares[0], shares[0], shares[1], shares[2]])
    other = shamir.split(secret, 3, [3, 5, 7, 9, 11])
    with pytest.raises(ShamirError, match="different splits"):
        shamir.reconstruct([shares[0], shares[1], other[2], other[3]])
    with pytest.raises(ShamirError):
        shamir.reconstruct([])
    with pytest.raises(ShamirError, match="threshold"):
        shamir.split(secret, 6, [1, 2, 3])
    with pytest.raises(ShamirError, match="distinct"):
        shamir.split(secret, 2, [1, 1, 2])


def test_shamir_shares_below_threshold_fit_every_secret():
    """t - 1 shares are consistent with any secret: add the point (0, s') and interpolate a valid polynomial."""
    shares = shamir.split(b"\x2a" * 15, 3, [1, 2, 3])
    weights = shamir._lagrange_at_zero([1, 2, 4])
    for guess in (b"\x00" * 15, b"\xff" * 15, b"\x2a" * 15):
        # The value at x=4 that, with the two real shares, interpolates to `guess` at zero.
        known = weights[0] * shares[0].limbs[0] + weights[1] * shares[1].limbs[0]
        value = (int.from_bytes(guess, "big") - known) * pow(weights[2], -1, shamir.PRIME) % shamir.PRIME
        third = shamir.Share(x=4, threshold=3, length=15, limbs=[value])
        assert shamir.reconstruct([shares[0], shares[1], third]) == guess


def test_shamir_share_roundtrips_through_json():
    share = shamir.split(b"k" * 32, 2, [1, 2])[1]
    assert shamir.Share.model_validate_json(share.model_dump_json()) == share
    assert max(share.limbs) < shamir.PRIME


# ---------------------------------------------------------------- sums

def _check_round(params: SecAggParams, inputs: dict[str, DeviceRound], dropouts: dict[str, Phase]) -> None:
    outcome = run_secure_round(params, inputs, dropouts)
    result = outcome.result
    never_masked = {d for d, phase in dropouts.items() if list(Phase).index(phase) <= list(Phase).index(Phase.MASKED_INPUT)}
    included = sorted(set(inputs) - never_masked)
    assert list(result.included) == included
    quantized, floats, mass, counts = _plain_sums(params, inputs, included)
    step = 2.0 ** -params.frac_bits
    for name in params.shapes:
        assert result.quantized_sum[name].dtype == np.int64
        np.testing.assert_array_equal(result.quantized_sum[name], quantized[name])
        assert np.abs(result.weighted_sum[name] - floats[name]).max() <= len(included) * step / 2 + 1e-12
        np.testing.assert_array_equal(result.counts[name], counts[name])
        np.testing.assert_allclose(result.mass[name], mass[name])
        expected_mean = np.divide(floats[name], mass[name], out=np.zeros_like(mass[name]), where=mass[name] > 0)
        np.testing.assert_allclose(result.mean()[name], expected_mean, atol=1e-5)


def test_mixed_tiers_sum_matches_plain_sum_and_per_element_counts():
    params = SecAggParams(round=3, threshold=4, shapes=GLOBAL)
    inputs = _inputs()
    _check_round(params, inputs, {})
    # Element (0, 0) of the conv is held by all six devices, (7, 3) only by the two full-width ones.
    result = run_secure_round(params, inputs).result
    assert result.counts["conv.weight"][0, 0, 0, 0] == 6
    assert result.counts["conv.weight"][7, 3, 2, 2] == 2
    assert result.counts["conv.bias"].tolist() == [6, 6, 4, 4, 2, 2, 2, 2]


@pytest.mark.parametrize("dropouts", [
    {"d1": Phase.MASKED_INPUT},  # shared its keys, never sent a masked input: its pair masks removed via its s-key
    {"d2": Phase.UNMASKING},  # masked, then went silent: its input counts, its self mask rebuilt from shares
    {"d1": Phase.MASKED_INPUT, "d4": Phase.MASKED_INPUT},
    {"d0": Phase.MASKED_INPUT, "d5": Phase.UNMASKING},
    {"d3": Phase.SHARE_KEYS, "d5": Phase.MASKED_INPUT},  # one never shared keys at all
], ids=["one-before-masking", "one-after-masking", "two-before-masking", "before-and-after", "before-sharing"])
def test_sum_survives_dropouts(dropouts):
    params = SecAggParams(round=1, threshold=3, shapes=GLOBAL)
    _check_round(params, _inputs(seed=len(dropouts)), dropouts)


def test_ring_of_64_bits_sums_exactly():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL, ring_bits=64, frac_bits=32, clip=1024.0)
    _check_round(params, _inputs(widths={"a": 1.0, "b": 0.5, "c": 0.25}), {"b": Phase.MASKED_INPUT})


def test_sum_reaching_the_clip_does_not_wrap():
    # 4 x 127.5 x 2^22 = 2^31 - 2^23: the sums come within 0.4% of the ring's signed range, both ways.
    params = SecAggParams(round=1, threshold=2, shapes={"w": (5,)}, clip=127.5, frac_bits=22, max_devices=4)
    signs = np.array([1, -1, 1, -1, 0.5], np.float32)
    inputs = {d: DeviceRound(shapes={"w": (5,)}, update={"w": signs * 63.75}, weight=2.0) for d in ("a", "b", "c", "d")}
    result = run_secure_round(params, inputs).result
    np.testing.assert_array_equal(result.weighted_sum["w"], signs.astype(np.float64) * 510)


def test_too_many_dropouts_is_a_clear_error():
    params = SecAggParams(round=1, threshold=4, shapes=GLOBAL)
    inputs = _inputs()
    late = {d: Phase.MASKED_INPUT for d in ("d0", "d1", "d2")}
    with pytest.raises(SecAggError, match="only 3 devices sent masked inputs, below the threshold 4"):
        run_secure_round(params, inputs, late)
    silent = {d: Phase.UNMASKING for d in ("d0", "d1", "d2")}
    with pytest.raises(SecAggError, match="only 3 devices answered the unmask request"):
        run_secure_round(params, inputs, silent)
    absent = {d: Phase.ADVERTISE for d in ("d0", "d1", "d2")}
    with pytest.raises(SecAggError, match="only 3 devices advertised keys"):
        run_secure_round(params, inputs, absent)


def test_parameters_that_could_wrap_and_updates_beyond_the_clip_are_refused():
    with pytest.raises(ValidationError, match="wraps"):
        SecAggParams(round=1, threshold=2, shapes=GLOBAL, clip=1024.0, frac_bits=16, max_devices=64)
    params = SecAggParams(round=1, threshold=2, shapes={"w": (3,)}, clip=1.0)
    inputs = {d: DeviceRound({"w": (3,)}, {"w": np.full(3, 0.4, np.float32)}, weight=3.0) for d in ("a", "b")}
    with pytest.raises(SecAggError, match="above the agreed clip"):
        run_secure_round(params, inputs)
    inputs["a"] = DeviceRound({"w": (3,)}, {"w": np.array([0.1, np.nan, 0], np.float32)})
    with pytest.raises(SecAggError, match="NaN"):
        run_secure_round(params, inputs)


# ---------------------------------------------------------------- privacy

N_PRIVACY = 20000
BINS = 64
CHI2_CRITICAL = 132.0  # chi-square, 63 degrees of freedom, p = 1e-6 (Wilson-Hilferty)
KS_COEFFICIENT = 2.69  # two-sample Kolmogorov-Smirnov, alpha = 1e-6


def _masked_inputs(updates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a round over one vector tensor and return what the aggregator received from each device, as ring integers."""
    params = SecAggParams(round=1, threshold=2, shapes={"w": (N_PRIVACY,)})
    inputs = {d: DeviceRound({"w": (N_PRIVACY,)}, {"w": u}) for d, u in updates.items()}
    outcome = run_secure_round(params, inputs)
    seen = {}
    for message in outcome.wire:
        if message.kind == "secagg_masked_input":
            parsed = MaskedInput.model_validate_json(message.payload)
            seen[parsed.device] = np.frombuffer(base64.b64decode(parsed.tensors["w"]), "<u4")
    assert set(seen) == set(updates)
    return seen


def _chi_square_uniform(ring: np.ndarray) -> float:
    observed = np.bincount((ring >> np.uint32(32 - 6)).astype(np.int64), minlength=BINS)
    expected = len(ring) / BINS
    return float(((observed - expected) ** 2 / expected).sum())


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def test_masked_updates_are_statistically_unrelated_to_the_true_ones():
    rng = np.random.default_rng(7)
    ramp = np.linspace(-30, 30, N_PRIVACY).astype(np.float32)
    updates = {"zeros": np.zeros(N_PRIVACY, np.float32), "ramp": ramp,
               "noise": rng.normal(0, 1, N_PRIVACY).astype(np.float32)}
    seen = _masked_inputs(updates)
    params = SecAggParams(round=1, threshold=2, shapes={"w": (N_PRIVACY,)})
    for device, masked in seen.items():
        # Uniform over the ring, while the true quantized update is anything but (the test can tell).
        assert _chi_square_uniform(masked) < CHI2_CRITICAL, device
        true_ring = quantize(updates[device], params).view(np.uint64).astype(np.uint32)
        assert _chi_square_uniform(true_ring) > 10 * CHI2_CRITICAL
        # No linear relation to the true values.
        if updates[device].std() > 0:
            correlation = np.corrcoef(masked.astype(np.float64), updates[device].astype(np.float64))[0, 1]
            assert abs(correlation) < 5 / math.sqrt(N_PRIVACY), (device, correlation)
    # An all-zero update and a ramp up to +-30 give indistinguishable masked distributions...
    critical = KS_COEFFICIENT * math.sqrt(2 / N_PRIVACY)
    assert _ks_two_sample(seen["zeros"], seen["ramp"]) < critical
    # ...whereas their true quantized values are told apart at once.
    assert _ks_two_sample(quantize(updates["zeros"], params), quantize(ramp, params)) > 10 * critical


def test_identical_updates_mask_differently():
    same = np.full(N_PRIVACY, 0.25, np.float32)
    seen = _masked_inputs({"a": same, "b": same})
    assert np.mean(seen["a"] == seen["b"]) < 0.001


# ---------------------------------------------------------------- hostile input

def _until_delivery(params: SecAggParams, inputs: dict[str, DeviceRound], options: dict[str, dict] | None = None):
    server = SecAggServer(params)
    devices = {d: SecAggDevice(d, params, part.shapes, **(options or {}).get(d, {})) for d, part in inputs.items()}
    for device in devices.values():
        server.add_advertisement(device.advertise())
    roster = server.roster()
    for device in devices.values():
        server.add_shares(device.share_keys(roster))
    return server, devices, server.deliveries()


def _until_unmask(params: SecAggParams, inputs: dict[str, DeviceRound]):
    server, devices, deliveries = _until_delivery(params, inputs)
    for d, delivery in deliveries.items():
        server.add_masked_input(devices[d].masked_input(delivery, inputs[d].update, inputs[d].weight))
    return server, devices, server.unmask_request()


def test_unmask_requests_that_would_reveal_an_input_are_refused():
    params = SecAggParams(round=1, threshold=3, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5, "c": 0.25, "d": 1.0})
    server, devices, request = _until_unmask(params, inputs)
    assert request.survivors == ["a", "b", "c", "d"] and request.dropped == []
    both = UnmaskRequest(round=1, survivors=["a", "b", "c", "d"], dropped=["b"])
    with pytest.raises(SecAggError, match=r"both the self-mask share and the key share of \['b'\]"):
        devices["a"].unmask(both)
    with pytest.raises(SecAggError, match="listed as dropped"):
        devices["a"].unmask(UnmaskRequest(round=1, survivors=["b", "c", "d"], dropped=["a"]))
    with pytest.raises(SecAggError, match="below the threshold"):
        devices["a"].unmask(UnmaskRequest(round=1, survivors=["a", "b"], dropped=["c", "d"]))
    with pytest.raises(SecAggError, match="do not partition"):
        devices["a"].unmask(UnmaskRequest(round=1, survivors=["a", "b", "c", "d", "e"], dropped=[]))
    # The honest request is answered once; a second one (say, claiming b dropped after all) is refused.
    server.add_unmasking(devices["a"].unmask(request))
    with pytest.raises(SecAggError, match="unmasking step while in phase done"):
        devices["a"].unmask(UnmaskRequest(round=1, survivors=["a", "c", "d"], dropped=["b"]))
    for d in ("b", "c"):
        server.add_unmasking(devices[d].unmask(request))
    expected, *_ = _plain_sums(params, inputs, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(server.result().quantized_sum["conv.weight"], expected["conv.weight"])


def test_tampered_or_rerouted_shares_fail_authentication():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5, "c": 0.25})
    _, devices, deliveries = _until_delivery(params, inputs)
    delivery = deliveries["a"]
    sealed = delivery.shares[0]
    flipped = bytearray(bytes.fromhex(sealed.ciphertext))
    flipped[5] ^= 0x01
    tampered = delivery.model_copy(update={"shares": [sealed.model_copy(update={"ciphertext": flipped.hex()}),
                                                      *delivery.shares[1:]]})
    with pytest.raises(SecAggError, match=f"shares from {sealed.sender} fail AES-GCM authentication"):
        devices["a"].masked_input(tampered, inputs["a"].update, 1.0)
    # A share b encrypted for c, relabelled as meant for a.
    for_c = next(s for s in deliveries["c"].shares if s.sender == "b")
    rerouted = delivery.model_copy(update={"shares": [
        EncryptedShares(sender="b", recipient="a", nonce=for_c.nonce, ciphertext=for_c.ciphertext),
        *[s for s in delivery.shares if s.sender != "b"]]})
    with pytest.raises(SecAggError, match="fail AES-GCM authentication"):
        devices["a"].masked_input(rerouted, inputs["a"].update, 1.0)
    # The untouched delivery still works: the refusals consumed nothing.
    assert devices["a"].masked_input(delivery, inputs["a"].update, 1.0).device == "a"


def test_the_aggregator_cannot_read_the_shares_it_routes():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5})
    _, devices, deliveries = _until_delivery(params, inputs)
    wire = deliveries["a"].model_dump_json()
    devices["a"].masked_input(deliveries["a"], inputs["a"].update, 1.0)
    held = devices["a"]._held["b"]  # the shares a decrypted from what the aggregator routed
    for limb in [*held.b_share.limbs, *held.s_share.limbs]:
        assert str(limb) not in wire and format(limb, "x") not in wire


def test_substituted_keys_are_refused_when_devices_are_enrolled():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5, "c": 0.25})
    signing = {d: Ed25519PrivateKey.generate() for d in inputs}
    enrolled = {d: k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
                for d, k in signing.items()}
    options = {d: {"signing_key": signing[d], "enrolled": enrolled} for d in inputs}
    server, devices, deliveries = _until_delivery(params, inputs, options)  # honest: every signature verifies
    assert set(deliveries) == {"a", "b", "c"}

    devices = {d: SecAggDevice(d, params, inputs[d].shapes, **options[d]) for d in inputs}
    adverts = [devices[d].advertise() for d in sorted(devices)]
    attacker_key = SecAggDevice("x", params, inputs["b"].shapes).advertise().c_public
    forged = [a.model_copy(update={"c_public": attacker_key}) if a.device == "b" else a for a in adverts]
    with pytest.raises(SecAggError, match="signature on the keys of b does not verify"):
        devices["a"].share_keys(KeyRoster(round=1, devices=forged))
    unsigned = [a.model_copy(update={"signature": None}) if a.device == "c" else a for a in adverts]
    with pytest.raises(SecAggError, match="keys of c are not signed"):
        devices["a"].share_keys(KeyRoster(round=1, devices=unsigned))


def test_devices_refuse_bad_rosters():
    params = SecAggParams(round=2, threshold=2, shapes=GLOBAL)
    devices = {d: SecAggDevice(d, params, _tier_shapes(w)) for d, w in {"a": 1.0, "b": 0.5, "c": 0.25}.items()}
    adverts = {d: device.advertise() for d, device in devices.items()}
    with pytest.raises(SecAggError, match="my own advertisement"):
        devices["a"].share_keys(KeyRoster(round=2, devices=[adverts["b"], adverts["c"]]))
    swapped = adverts["a"].model_copy(update={"s_public": adverts["b"].s_public})
    with pytest.raises(SecAggError, match="reuses a public key"):
        devices["c"].share_keys(KeyRoster(round=2, devices=[swapped, adverts["b"], adverts["c"]]))
    with pytest.raises(SecAggError, match="threshold"):
        devices["a"].share_keys(KeyRoster(round=2, devices=[adverts["a"]]))
    with pytest.raises(SecAggError, match="round 1, not 2"):
        devices["a"].share_keys(KeyRoster(round=1, devices=list(adverts.values())))
    wide = adverts["b"].model_copy(update={"shapes": {"conv.weight": (9, 4, 3, 3), "conv.bias": (8,)}})
    with pytest.raises(SecAggError, match="does not fit"):
        devices["a"].share_keys(KeyRoster(round=2, devices=[adverts["a"], wide, adverts["c"]]))


def test_aggregator_refuses_malformed_duplicate_and_late_messages():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5, "c": 0.25})
    server, devices, deliveries = _until_delivery(params, inputs)
    masked = devices["a"].masked_input(deliveries["a"], inputs["a"].update, inputs["a"].weight)
    short = masked.model_copy(update={"tensors": {**masked.tensors, "conv.bias": base64.b64encode(b"\0" * 4).decode()}})
    with pytest.raises(SecAggError, match="has 4 bytes"):
        server.add_masked_input(short)
    garbage = masked.model_copy(update={"tensors": {**masked.tensors, "conv.bias": "not base64!"}})
    with pytest.raises(SecAggError, match="not base64"):
        server.add_masked_input(garbage)
    with pytest.raises(SecAggError, match="not part of this phase"):
        server.add_masked_input(masked.model_copy(update={"device": "zed"}))
    server.add_masked_input(masked)
    with pytest.raises(SecAggError, match="twice"):
        server.add_masked_input(masked)
    server.add_masked_input(devices["b"].masked_input(deliveries["b"], inputs["b"].update, 1.0))
    server.unmask_request()
    late = devices["c"].masked_input(deliveries["c"], inputs["c"].update, 1.0)
    with pytest.raises(SecAggError, match="masked_input message from c while the round is in unmasking"):
        server.add_masked_input(late)
    with pytest.raises(SecAggError, match="advertise message"):
        server.add_advertisement(AdvertiseKeys.model_validate_json(json.dumps(
            {"round": 1, "device": "n", "c_public": "0" * 64, "s_public": "1" * 64, "shapes": {}})))


def test_shares_from_a_roster_outsider_or_for_another_device_are_refused():
    params = SecAggParams(round=1, threshold=2, shapes=GLOBAL)
    inputs = _inputs(widths={"a": 1.0, "b": 0.5})
    _, devices, deliveries = _until_delivery(params, inputs)
    sealed = deliveries["a"].shares[0]
    stranger = ShareDelivery(round=1, device="a", shares=[sealed.model_copy(update={"sender": "mallory"})])
    with pytest.raises(SecAggError, match="not from a roster device"):
        devices["a"].masked_input(stranger, inputs["a"].update, 1.0)
    with pytest.raises(SecAggError, match="addressed to b"):
        devices["a"].masked_input(deliveries["b"], inputs["a"].update, 1.0)
