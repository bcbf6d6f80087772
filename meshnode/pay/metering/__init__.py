"""Per-job metering over a channel: the provider's gates (admission, vouchers in) and the
client's payer (vouchers out).
"""
