"""A TCP proxy on loopback that can be frozen: every connection stays open, new ones are
accepted (the kernel does that anyway), and nothing is forwarded either way, as with a network
partition behind a firewall or NAT that keeps the connection's state. Thawed, it forwards what
it held back."""

from __future__ import annotations

import socket
import threading


class FreezableProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, name="freezeproxy", daemon=True).start()

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        for sock in self._socks:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._socks.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # frozen: the server never hears of this client
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        self._socks.append(server)
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            self._open.wait()  # frozen: hold the bytes, keep the connection
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return
