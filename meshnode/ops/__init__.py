"""Operating a node: its status (views), the control socket, metrics and status page.

Above `node.py` (it reads nodes), below the CLI. Every endpoint here is read-only and
local by default: the control socket is a 0600 Unix socket, HTTP binds loopback.
"""
