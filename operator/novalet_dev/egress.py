"""The kube-apiserver's way into the node's network namespace: an HTTP CONNECT proxy on a unix socket.

The apiserver runs on loopback in the machine's namespace; the node (kubelet, containerd, pods)
runs in a namespace of its own (node.py). The apiserver's egress selector sends everything bound
for the cluster (webhooks behind Services, kubelets) as `CONNECT host:port` over a unix socket,
the transport the konnectivity proxy uses. This process runs inside the node's namespace, so the
connections it opens start and end there. Only addresses of the given networks are dialled.

Started as `nsenter --net=NETNS python3 -I -S egress.py SOCKET CIDR [CIDR ...]`; standard library only.
"""
import asyncio
import ipaddress
import os
import sys

MAX_HEADER = 8192


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


def target(request_line: bytes, allowed: list) -> tuple[str, int]:
    """(host, port) of `CONNECT host:port HTTP/1.1`, when host is an address of an allowed network."""
    method, authority, _ = request_line.decode("ascii").split(" ", 2)
    if method != "CONNECT":
        raise ValueError(f"{method}: only CONNECT")
    host, _, port = authority.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    if not any(address in net for net in allowed):
        raise ValueError(f"{address} is outside the node's networks")
    return str(address), int(port)


async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, allowed: list) -> None:
    try:
        head = await client_reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER:
            raise ValueError("header too long")
        host, port = target(head.split(b"\r\n", 1)[0], allowed)
        upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (TimeoutError, ValueError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        reason = " ".join(str(e).split())  # one header line, whatever the error said
        client_writer.write(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nX-Reason: {reason}\r\n\r\n"
                            .encode("ascii", "replace"))
        client_writer.close()
        return
    client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


async def main(socket_path: str, cidrs: list[str]) -> None:
    allowed = [ipaddress.ip_network(c) for c in cidrs]
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = await asyncio.start_unix_server(lambda r, w: serve(r, w, allowed), socket_path)
    os.chmod(socket_path, 0o600)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
