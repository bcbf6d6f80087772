"""The light client's parts: a directory that verifies adverts before the router may use
them, a dialer, and the peer statistics kept across restarts. `meshnode.node.ClientNode`
composes them with routed jobs into the thin client callers use."""
