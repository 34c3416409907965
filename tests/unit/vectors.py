"""The public test vector of PROTOCOL.md section 2."""

from migrate.endpoints import parse_server_list

CHAIN_KEY = bytes(range(32))
CHAIN_KEY_HEX = CHAIN_KEY.hex()
CHAIN_LENGTH = 1000
M = 6
TICK = 1.0
START = 0.0
SERVERS_TEXT = "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"
SERVERS = parse_server_list(SERVERS_TEXT)
K1_HEX = "b4f7f766643b1e0feca47eb9ba9f288aa020944d3e97c114417a25d1e0d719fe"
TABLE = [
    (1, 0.0, 48.0, "10.0.0.3:80"),
    (2, 48.0, 40.0, "10.0.0.3:80"),
    (3, 88.0, 29.0, "10.0.0.3:80"),
    (4, 117.0, 53.0, "10.0.0.3:80"),
    (5, 170.0, 44.0, "10.0.0.1:80"),
]
