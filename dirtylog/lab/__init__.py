"""The arm64 lab: a Debian arm64 system booted under QEMU's EL2 emulation, with dirtylog inside.

The seed patch is ARM's; these hosts are x86. QEMU emulates an arm64 machine *with* EL2
(``-M virt,virtualization=on``), a stock Debian arm64 kernel boots in it with KVM, and dirtylog runs
there natively against the real arm64 ``/dev/kvm``. Everything comes from package registries: the
kernel and Python from Debian's arm64 packages (fetched with a private apt state, the host's dpkg
untouched), NumPy and the rest from PyPI's aarch64 wheels. Modules, lowest first:

``cpio``        the initramfs format (newc), pure
``debian``      a private apt for arm64: mirrors from the host's sources, resolve, download, unpack
``wheels``      aarch64 wheels with pip, unpacked
``environment`` the cached root filesystem, kernels, and the per-run payload (dirtylog's source, the command)
``qemu``        the QEMU command line, booting, streaming output, the command's exit status
"""
