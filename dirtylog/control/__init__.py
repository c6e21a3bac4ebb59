"""QMP control: QEMU's machine protocol on a socket, so that qmp-shell, the ``qemu.qmp`` library and
operators' scripts drive a dirtylog machine as they drive QEMU.

Pure protocol first (``json_stream``, ``protocol``, ``schema``, ``commands``: no sockets), then the
command handlers (``vm``: run state and lifecycle; ``migration``: migrate, parameters, capabilities,
query-migrate), the thin transport (``server``), the monitor that ties them to one machine
(``monitor``) and a small client (``client``, used by ``dirtylog ctl``). See docs/qmp.md.
"""
