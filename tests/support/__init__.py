"""Test support: real server processes, client runners and a raw-socket NBD client."""

from .servers import (  # noqa: F401
    PynbdServer,
    QemuNbdServer,
    free_tcp_port,
    libnbd_script,
    make_raw_image,
    nbdcopy,
    nbdinfo,
    pynbd_available,
    qemu_img,
    qemu_io,
    run,
)
