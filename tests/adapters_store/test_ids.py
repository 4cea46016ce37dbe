from __future__ import annotations

import pytest

from adapters_store import USER_ID_PATTERN, InvalidUserId, StoreError, validate_user_id


@pytest.mark.parametrize("good", ["a", "user-1", "A.b_c-9", "x" * 128, "..a", "a.."])
def test_valid_ids_pass_unchanged(good: str) -> None:
    assert validate_user_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "a/b", "a\\b", "x" * 129, "x" * 200, ".", "..", "a b", "ü", "a\x00b", "/abs"],
)
def test_invalid_ids_raise_with_pattern(bad: str) -> None:
    with pytest.raises(InvalidUserId) as info:
        validate_user_id(bad)
    assert USER_ID_PATTERN in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)


def test_non_string_id_is_rejected() -> None:
    with pytest.raises(InvalidUserId, match="string"):
        validate_user_id(42)  # type: ignore[arg-type]
