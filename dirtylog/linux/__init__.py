"""The Linux interfaces dirtylog uses beside KVM: userfaultfd, PAGEMAP_SCAN, ptrace, /proc, raw syscalls.

``abi`` holds the kernel's structures and numbers only; the other modules are thin typed wrappers, one
object per fd and one method per ioctl, as :mod:`dirtylog.kvm` does for KVM.
"""
