"""Watching the other processes of a job, so that a dead one stops this one at once.

JAX notices a dead process only when its heartbeats stop (``--heartbeat_timeout``), and then
ends the others by aborting them from C++ with a stack trace; until then they wait in the
collective their dead peer never joins. A process that dies closes its sockets at once,
though: so every process keeps one TCP connection to process 0, and a connection that ends
without a goodbye means the process at its other end failed or was killed. The watcher thread
then prints one line naming it and exits this process with code 2.

A process that finishes says goodbye when it exits; one that stops on an error leaves
without it (``exit_job``), so its peers stop too instead of waiting for it in a collective.
"""

from __future__ import annotations

import atexit
import os
import selectors
import socket
import sys
import threading

GOODBYE = b"bye\n"
_CONNECT_TIMEOUT_SECONDS = 30.0
EXIT_CODE = 2


class _Link:
    """This process's connections to its peers and the thread that watches them."""

    def __init__(self, process_id: int, num_processes: int):
        self.process_id, self.num_processes = process_id, num_processes
        self.selector = selectors.DefaultSelector()
        self.peers: dict[socket.socket, int] = {}  # connection -> the peer's process index
        self.said_goodbye: set[int] = set()
        self.lock = threading.Lock()
        self.closing = False

    def watch(self, connection: socket.socket, peer: int) -> None:
        with self.lock:
            self.peers[connection] = peer
            self.selector.register(connection, selectors.EVENT_READ, peer)

    def run(self, listener: socket.socket | None) -> None:
        if listener is not None:
            self.selector.register(listener, selectors.EVENT_READ, None)
        while not self.closing:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fileobj is listener:
                    self._accept(listener)
                elif not self.closing:
                    self._read(key.fileobj, key.data)

    def _accept(self, listener: socket.socket) -> None:
        connection, _ = listener.accept()
        connection.settimeout(_CONNECT_TIMEOUT_SECONDS)
        try:
            peer = int(connection.makefile("rb").readline())  # it introduces itself
        except (OSError, ValueError):
            connection.close()
            return
        connection.settimeout(None)
        self.watch(connection, peer)

    def _read(self, connection: socket.socket, peer: int) -> None:
        try:
            data = connection.recv(64)
        except OSError:
            data = b""
        if GOODBYE in data:
            self.said_goodbye.add(peer)
        if data:
            return
        with self.lock:
            if self.closing or peer in self.said_goodbye:
                return
        self._stop(peer)

    def _stop(self, peer: int) -> None:
        if peer == 0:
            lost = f"lost process 0 of {self.num_processes}, the coordinator"
        else:
            lost = f"process {peer} of {self.num_processes} left the job without finishing"
        print(
            f"\nldm-jax: error: {lost} (it failed or was killed; see its output); stopping "
            f"process {self.process_id} too",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_CODE)

    def close(self, goodbye: bool) -> None:
        """Leaves the job: every connection closed, after a goodbye when ``goodbye``."""
        with self.lock:
            self.closing = True
            for connection in self.peers:
                self.selector.unregister(connection)
                try:
                    if goodbye:
                        connection.sendall(GOODBYE)
                    connection.close()
                except OSError:  # the peer is gone already
                    pass
            self.peers.clear()


_link: _Link | None = None


def watch(process_id: int, num_processes: int, coordinator_host: str) -> bool:
    """Connects this process to process 0 (process 0: listens for every other one) and starts
    watching; must run on every process of the job, right after it joined.

    Process 0 listens on a free port of every interface and tells the others which one
    (a broadcast over the job). When a peer cannot connect (a firewall between hosts), the
    job runs unwatched, its dead processes found by the heartbeat only.

    Returns:
      Whether this process is watching its peers.
    """
    global _link
    import numpy as np
    from jax.experimental import multihost_utils

    link = _Link(process_id, num_processes)
    listener = None
    if process_id == 0:
        listener = socket.create_server(("", 0), backlog=max(num_processes, 8))
        port = listener.getsockname()[1]
    else:
        port = 0
    port = int(multihost_utils.broadcast_one_to_all(np.asarray(port, np.int32)))
    if process_id > 0:
        try:
            connection = socket.create_connection(
                (coordinator_host, port), timeout=_CONNECT_TIMEOUT_SECONDS
            )
        except OSError as error:
            print(
                f"ldm-jax: warning: process {process_id} cannot reach process 0 at "
                f"{coordinator_host}:{port} ({error}); a dead process is found by the "
                "heartbeat only (--heartbeat_timeout)",
                file=sys.stderr,
            )
            return False
        connection.sendall(f"{process_id}\n".encode())
        connection.settimeout(None)
        link.watch(connection, 0)
    threading.Thread(target=link.run, args=(listener,), name="peer-watch", daemon=True).start()
    _link = link
    atexit.register(link.close, goodbye=True)
    return True


def exit_job(code: int) -> None:
    """Ends this process without a goodbye, so its peers stop too, when it watches them (a
    multi-process job); returns otherwise. Exits at once: jax's shutdown would wait for the
    peers at a barrier they no longer reach."""
    if _link is None:
        return
    _link.close(goodbye=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
