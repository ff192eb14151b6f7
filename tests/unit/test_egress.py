"""The apiserver's egress proxy into the node's namespace (novalet_dev/egress.py): it carries
CONNECT tunnels to the node's own networks and refuses every other address without dialling it,
so the apiserver can never be steered out of the stack's namespaces. Run here on loopback, with
loopback as the "node network"."""
import asyncio

import pytest

from novalet_dev import egress


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def connect(socket_path: str, authority: str) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return await reader.readuntil(b"\r\n\r\n"), reader, writer


@pytest.fixture
async def proxy(tmp_path):
    path = str(tmp_path / "egress.sock")
    task = asyncio.create_task(egress.main(path, ["127.0.0.1/32"]))
    for _ in range(100):
        if (tmp_path / "egress.sock").exists():
            break
        await asyncio.sleep(0.01)
    yield path
    task.cancel()


async def test_a_tunnel_to_the_node_network_carries_bytes_both_ways(proxy):
    server, port = await echo_server()
    head, reader, writer = await connect(proxy, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(100), 5) == b"ping"
    writer.close()
    server.close()


@pytest.mark.parametrize("authority", ["10.0.0.7:443", "192.0.2.2:8443", "[::1]:443", "8.8.8.8:53"])
async def test_an_address_outside_the_node_networks_is_refused(proxy, authority):
    head, _, writer = await connect(proxy, authority)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"outside the node's networks" in head
    writer.close()


def test_only_connect_and_only_addresses():
    with pytest.raises(ValueError, match="only CONNECT"):
        egress.target(b"GET http://127.0.0.1/ HTTP/1.1", [])
    with pytest.raises(ValueError):  # a name would need a resolver, outside the namespace
        egress.target(b"CONNECT kubernetes.default.svc:443 HTTP/1.1", [])
