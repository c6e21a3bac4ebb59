"""The arm64 acquire fence: its two instruction words are what binutils makes of ``dmb ishld; ret``, and it runs."""

from __future__ import annotations

from dirtylog.kvm import fence
from tests.guest.test_a64 import binutils, gnu_assemble


@binutils
def test_the_fence_words_are_dmb_ishld_and_ret() -> None:
    code = gnu_assemble("dmb ishld\nret\n")
    assert code == fence.DMB_ISHLD.to_bytes(4, "little") + fence.RET.to_bytes(4, "little")


def test_the_fence_can_be_called_on_this_host() -> None:
    fence.load_acquire_fence()  # on arm64 this executes the two words; elsewhere it is nothing
