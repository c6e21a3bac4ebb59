"""What the user decides and what the user reads, as pure code: the pre-copy policy and its controller,
the migration parameters, and the statistics in QEMU's words. Nothing here touches a socket or a VM."""
