"""Ed25519 signing of desired state: what the control plane signs, the agent verifies or rejects."""

from __future__ import annotations

import base64
import json
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import (
    SIGNING_CONTEXT,
    DesiredState,
    EnrollmentGrant,
    RejectionReason,
    SignatureError,
    SignedDesiredState,
    canonical_json,
    content_hash,
    decode_public_key,
    encode_public_key,
    sign_state,
    verify_state,
)
from tests.agent import samples

KEY = samples.CONTROL_PLANE_KEY
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _over_the_wire(signed: SignedDesiredState) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(signed.model_dump_json())
    return data


def _reason(signed: SignedDesiredState, **kwargs: Any) -> RejectionReason:
    with pytest.raises(SignatureError) as excinfo:
        verify_state(signed, KEY.public_key(), **kwargs)
    return excinfo.value.reason


def test_signed_state_verifies_after_a_json_round_trip() -> None:
    state = samples.desired_state()
    wire = sign_state(state, KEY).model_dump_json()
    received = SignedDesiredState.model_validate_json(wire)
    assert (
        verify_state(received, KEY.public_key(), node_id=samples.NODE, applied_generation=6)
        == state
    )


def test_signature_is_ed25519_over_context_and_canonical_bytes() -> None:
    state = samples.desired_state()
    signed = sign_state(state, KEY)
    assert signed.signature is not None
    raw = base64.b64decode(signed.signature)
    assert len(raw) == 64
    KEY.public_key().verify(raw, SIGNING_CONTEXT + canonical_json(state))


def test_tampered_payload_is_a_bad_signature() -> None:
    data = _over_the_wire(sign_state(samples.desired_state(), KEY))
    data["state"]["components"]["workers"][0]["max_batch_size"] = 512
    # The attacker even fixes up the content hash; the signature still covers it.
    tampered = SignedDesiredState.model_validate(data)
    fixed = tampered.state.model_copy(
        update={"content_hash": content_hash(tampered.state.components)}
    )
    assert _reason(tampered.model_copy(update={"state": fixed})) == "bad_signature"


def test_tampered_generation_is_a_bad_signature() -> None:
    data = _over_the_wire(sign_state(samples.desired_state(), KEY))
    data["state"]["generation"] += 1
    assert _reason(SignedDesiredState.model_validate(data)) == "bad_signature"


def test_signature_from_another_key_is_a_bad_signature() -> None:
    assert _reason(sign_state(samples.desired_state(), OTHER_KEY)) == "bad_signature"


def test_truncated_signature_is_a_bad_signature() -> None:
    signed = sign_state(samples.desired_state(), KEY)
    assert signed.signature is not None
    short = base64.b64encode(base64.b64decode(signed.signature)[:32]).decode()
    assert _reason(signed.model_copy(update={"signature": short})) == "bad_signature"


def test_missing_signature_is_unsigned() -> None:
    data = _over_the_wire(sign_state(samples.desired_state(), KEY))
    del data["signature"]
    assert _reason(SignedDesiredState.model_validate(data)) == "unsigned"


def test_signed_state_whose_hash_does_not_match_is_a_hash_mismatch() -> None:
    # A control plane bug (not an attacker): correctly signed, inconsistent content.
    state = samples.desired_state().model_copy(update={"content_hash": "0" * 64})
    signature = KEY.sign(SIGNING_CONTEXT + canonical_json(state))
    signed = SignedDesiredState(state=state, signature=base64.b64encode(signature).decode())
    assert _reason(signed) == "hash_mismatch"


def test_state_for_another_node_is_wrong_node() -> None:
    signed = sign_state(samples.desired_state(), KEY)
    assert _reason(signed, node_id=UUID(int=1)) == "wrong_node"


@pytest.mark.parametrize(("applied", "reason"), [(8, "stale_generation"), (7, "replayed")])
def test_old_or_repeated_generation_is_refused(applied: int, reason: RejectionReason) -> None:
    signed = sign_state(samples.desired_state(generation=7), KEY)
    assert _reason(signed, node_id=samples.NODE, applied_generation=applied) == reason


def test_signature_error_reads_well() -> None:
    error = SignatureError("replayed", "generation 7 is already applied")
    assert str(error) == "replayed: generation 7 is already applied"
    assert error.detail == "generation 7 is already applied"


def test_signing_refuses_an_inconsistent_state() -> None:
    state = samples.desired_state().model_copy(update={"content_hash": "0" * 64})
    with pytest.raises(ValueError, match="DesiredState.build"):
        sign_state(state, KEY)


def test_build_computes_the_content_hash() -> None:
    components = samples.components()
    state = DesiredState.build(samples.NODE, 1, samples.NOW, components)
    assert state.content_hash == content_hash(components)


def test_public_key_travels_in_the_enrollment_grant_and_verifies() -> None:
    grant = next(m for m in samples.all_messages() if isinstance(m, EnrollmentGrant))
    received = EnrollmentGrant.model_validate(json.loads(grant.model_dump_json()))
    public_key = decode_public_key(received.control_plane_public_key)
    signed = sign_state(samples.desired_state(), KEY)
    assert verify_state(signed, public_key) == signed.state


def test_public_key_encoding_is_raw_32_bytes() -> None:
    text = encode_public_key(KEY.public_key())
    assert base64.b64decode(text) == KEY.public_key().public_bytes_raw()
    assert decode_public_key(text).public_bytes_raw() == KEY.public_key().public_bytes_raw()


@pytest.mark.parametrize("text", ["", "AAAA", base64.b64encode(bytes(33)).decode(), "!!!!"])
def test_decoding_a_malformed_public_key_fails(text: str) -> None:
    with pytest.raises(ValueError):
        decode_public_key(text)
