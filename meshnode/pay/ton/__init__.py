"""TON chain access: the Chain protocol and its implementations (the TVM emulator, the
local dev chain shared through a file, the liteclient chain with a wallet-v4r2), the
choice among them, and reading a channel's state.
"""
